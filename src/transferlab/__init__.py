"""transferlab: image classification by transfer learning, offline on a CPU.

    import transferlab
    run = transferlab.train("data/hymenoptera", out="runs/r1", strategy="freeze")
    run.predict(["photo.jpg"])
    transferlab.evaluate("runs/r1", "other_data/")
"""

__version__ = "0.1.0"

__all__ = ["TrainConfig", "Run", "TransferlabError", "train", "evaluate", "load_run", "list_backbones",
           "run_experiment", "render_report", "__version__"]


def __getattr__(name: str):
    # Lazy: `import transferlab` stays cheap (torch, timm and sklearn load only when used).
    if name in ("train", "evaluate", "load_run"):
        from . import api

        return getattr(api, name)
    if name == "run_experiment":
        from .experiment import run_experiment

        return run_experiment
    if name == "render_report":
        from .report import render_report

        return render_report
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "Run":
        from .run import Run

        return Run
    if name == "TransferlabError":
        from .errors import TransferlabError

        return TransferlabError
    if name == "list_backbones":
        from .backbones import list_backbones

        return list_backbones
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
