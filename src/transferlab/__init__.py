"""transferlab: image classification by transfer learning, offline on a CPU.

    import transferlab
    run = transferlab.train("data/hymenoptera", out="runs/r1", strategy="freeze")
    run.predict(["photo.jpg"])
    transferlab.evaluate("runs/r1", "other_data/")
    transferlab.export("runs/r1", quantize="int8")
"""

__version__ = "0.1.0"

__all__ = ["TrainConfig", "Run", "TransferlabError", "train", "evaluate", "load_run", "load_predictor", "export",
           "list_backbones", "run_experiment", "render_report", "__version__"]


_LAZY = {"train": "api", "evaluate": "api", "load_run": "api", "load_predictor": "api", "export": "api",
         "run_experiment": "api", "render_report": "api",
         "TrainConfig": "config", "Run": "run", "TransferlabError": "errors", "list_backbones": "models.backbones"}


def __getattr__(name: str):
    # Lazy: `import transferlab` stays cheap (torch, timm and sklearn load only when used).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
