"""Command-line interface: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from . import __version__
from .options import (
    AUGMENT_POLICIES,
    BN_MODES,
    CLASS_WEIGHTS,
    DEVICES,
    ENGINES,
    OPTIMIZERS,
    POOL_MODES,
    PRECISIONS,
    PREDICTION_FORMATS,
    QUANTIZATIONS,
    SAMPLERS,
    STRATEGIES,
    TRAIN_STRATEGIES,
    parse_duration,
)

log = logging.getLogger("transferlab")


def _duration(text: str) -> float:
    from .errors import TransferlabError

    try:
        return parse_duration(text)
    except TransferlabError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


def _add_recipe_options(add) -> None:
    """The fine-tuning recipe's options, each off by default (``add``: _add_train_options's adder)."""
    S = argparse.SUPPRESS
    add("--layer-decay", type=float, default=S, metavar="FACTOR",
        help="fine-tuning: the backbone's last block at lr x --backbone-lr-mult, each earlier block (and the stem) "
             "at FACTOR x the one after it, e.g. 0.75 (default 1: off)")
    add("--mixup", type=float, default=S, metavar="ALPHA",
        help="fine-tuning: Mixup with this Beta alpha, e.g. 0.2; soft targets carry the label smoothing "
             "(default 0: off)")
    add("--cutmix", type=float, default=S, metavar="ALPHA",
        help="fine-tuning: CutMix with this alpha, e.g. 1.0; with --mixup each batch uses one of them (default 0: off)")
    add("--ema", type=float, default=S, metavar="DECAY",
        help="fine-tuning: validate, keep and save a moving average of the weights with this decay (timm "
             "ModelEmaV3 with warm-up), e.g. 0.999 (default 0: off)")
    add("--bn-update", action="store_true", default=S,
        help="fine-tuning: first re-estimate the backbone's BatchNorm statistics on the training images (AdaBN; "
             "for data far from ImageNet: aerial, grey-scale, medical); default off")
    add("--augment-policy", default=S, choices=AUGMENT_POLICIES,
        help="fine-tuning augmentation after crop + flip: basic (default: nothing more), trivial "
             "(TrivialAugmentWide), randaugment (RandAugment)")
    add("--crop-scale", type=float, default=S, metavar="MIN",
        help="smallest area fraction of the random resized crop (0.35)")


def _add_trust_options(add) -> None:
    """What a validation split is used for besides model selection (transferlab.trust)."""
    S = argparse.SUPPRESS
    add("--keep-known", type=float, default=S, metavar="SHARE",
        help="with a validation split: the unknown threshold keeps this share of known images (0.95)")
    add("--coverage", type=float, default=S, metavar="LEVEL",
        help="with a validation split: prediction sets contain the true class with this probability (0.9)")


def _add_machine_options(add) -> None:
    """Where and how fast a run computes (the image store and the loader change no result)."""
    S = argparse.SUPPRESS
    add("--precision", default=S, choices=PRECISIONS, help="default: auto")
    add("--device", default=S, choices=DEVICES, help="default: auto")
    add("--engine", default=S, choices=ENGINES,
        help="inference engine for frozen features and testing (auto: ONNX Runtime for fp32 on a CPU)")
    add("--cache-dir", default=S, help="frozen-feature cache and decoded-image store (default: "
        "$TRANSFERLAB_CACHE_DIR, else $XDG_CACHE_HOME/transferlab or ~/.cache/transferlab); 'none': neither, "
        "fine-tuning keeps decoded images in memory")
    add("--loader-workers", type=int, default=S, metavar="N",
        help="processes that read and augment training images (default 0: the training process; "
             "results are the same for any N)")


def _add_train_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    # Defaults are None here so that options given with --config can be told apart; TrainConfig owns
    # the real defaults (listed in the README). ``skip``: options another subcommand replaces (a grid).
    S = argparse.SUPPRESS

    def add(*names, **kwargs):
        if names[0] not in skip:
            p.add_argument(*names, **kwargs)
    add("--test-dir", default=S, help="folder of class subfolders used as the test split")
    add("--labels", default=S, metavar="FILE.csv", help="CSV with columns path,label instead of class folders")
    add("--backbone", default=S, help="efficientnet_lite0 (default), efficientnet_lite1/2, a torchvision name "
        "(vgg16, resnet50, ...) or timm/NAME")
    add("--weights", default=S, help="'default' (the backbone's pretrained weights), 'none' (random init) "
        "or a .pth/.safetensors file")
    add("--strategy", default=S, choices=TRAIN_STRATEGIES,
        help="default: unfreeze; auto: rank frozen backbones x resolutions x heads by cross-validation, fine-tune "
             "the best, keep whichever wins on the validation split")
    add("--unfreeze-last", type=int, default=S, metavar="N", help="blocks trained by --strategy partial (2)")
    add("--bn", default=S, choices=BN_MODES, help="BatchNorm of the backbone (default: frozen)")
    add("--head", default=S, help="hidden layer sizes: 256 (default), 512x128, 0 = linear")
    add("--dropout", type=float, default=S, help="dropout before each head layer (0.2)")
    add("--pool", default=S, choices=POOL_MODES, help="global average pooling (default) or flatten")
    add("--image-size", type=int, default=S, help="input resolution (default: the backbone's own)")
    add("--optimizer", default=S, choices=OPTIMIZERS, help="default: adamw")
    add("--lr", type=float, default=S, help="head learning rate (default: adamw/adam 1e-3, sgd 1e-2)")
    add("--backbone-lr-mult", type=float, default=S, help="backbone lr = lr x this (0.1)")
    add("--weight-decay", type=float, default=S, help="default: adamw 0.01, adam 0, sgd 1e-4")
    add("--epochs", type=int, default=S, help="default: freeze 30, unfreeze/partial 8")
    add("--head-epochs", type=int, default=S, help="head-only epochs on cached features before fine-tuning (5)")
    add("--warmup-epochs", type=float, default=S, help="linear lr warm-up before the cosine decay (1)")
    add("--batch-size", type=int, default=S, help="default: 32")
    add("--label-smoothing", type=float, default=S, help="default: 0.1")
    add("--class-weights", default=S, choices=CLASS_WEIGHTS, help="loss weights per class (none)")
    add("--sampler", default=S, choices=SAMPLERS,
        help="balanced: draw every class equally often in each epoch (default: shuffle)")
    add("--tta", action=argparse.BooleanOptionalAction, default=S,
        help="test-time augmentation: average 4 views (centre, flip, whole image, its flip); "
             "evaluate and predict inherit it (default: off)")
    add("--no-augment", dest="augment", action="store_false", default=S,
        help="no random resized crop + flip (nor --augment-policy) while fine-tuning")
    _add_recipe_options(add)
    _add_trust_options(add)
    add("--test-size", type=float, default=S, help="test fraction when DATA_DIR has no test folder (0.2)")
    add("--val-size", type=float, default=S,
        help="validation fraction carved from train for model selection (0: fixed schedule, keep last epoch)")
    add("--patience", type=int, default=S, help="early stopping after N epochs without validation gain")
    add("--time-limit", type=_duration, default=S, metavar="DURATION",
        help="e.g. 10m: stop cleanly with the best so far (auto: the whole search fits it)")
    add("--seed", type=int, default=S, help="default: 0")
    add("--strict", action="store_true", default=S, help="stop at the first unreadable image")
    _add_machine_options(add)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description="Image classification by transfer learning.")
    parser.add_argument("--version", action="version", version=f"transferlab {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars: one line per epoch")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_evaluate, _add_predict, _add_export, _add_serve, _add_backbones, _add_experiment,
                _add_report, _add_audit):
        p = add(sub)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    return parser


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a classifier on an image folder")
    p.add_argument("data_dir", nargs="?", help="class-per-subfolder image tree")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--config", help="config.json of an earlier run to re-create (options given here override)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out (re-running the "
                   "same command without it resumes too; with it, a missing checkpoint is an error)")
    _add_track_option(p, "OUT/tensorboard; mlflow: sqlite:///OUT/mlruns.db")
    _add_train_options(p)
    return p


def _add_track_option(p: argparse.ArgumentParser, defaults: str) -> None:
    p.add_argument("--track", action="append", metavar="TRACKER",
                   help="also log to tensorboard[=DIR] or mlflow[=URI] (repeatable; the extras "
                        "transferlab[tensorboard], transferlab[mlflow]); default locations: tensorboard: "
                        f"{defaults}. A tracker that fails is one warning: the run directory stays complete")


def _add_evaluate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="evaluate a run on another image folder")
    p.add_argument("run_dir")
    p.add_argument("data_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/evaluations/<name>)")
    p.add_argument("--class-map", help="JSON object (inline or file): dataset class -> model class")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help="test-time augmentation (default: as trained)")
    p.add_argument("--engine", default="auto", choices=ENGINES)
    p.add_argument("--unknown", metavar="DIR", help="a folder of images of none of the classes: AUROC of the unknown "
                   "score and the share flagged (needs a run trained with a validation split)")
    return p


def _add_predict(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="predict classes of images; one JSON line per image")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help="test-time augmentation (default: as trained)")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="auto: the run's exported model.onnx without torch when it is current, else torch "
                   "(ONNX Runtime for fp32 on a CPU from 64 images on); torch: always torch")
    p.add_argument("--format", default="json", choices=PREDICTION_FORMATS,
                   help="json: one object per line (default); csv: a table")
    p.add_argument("--gradcam", metavar="OUT_DIR", help="also write each image's Grad-CAM heat map of its "
                   "predicted class to OUT_DIR/<name>_gradcam.png")
    return p


def _add_serve(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="a web page and JSON API for a run (drop images, see classes and Grad-CAM)")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20)")
    p.add_argument("--batch-size", type=int, default=16, help="most images in one forward pass (default 16)")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting at most; more get 503 (64)")
    p.add_argument("--no-explain", dest="explain", action="store_false", help="no Grad-CAM (no torch needed)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; default: none)")
    return p


def _add_export(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a run to ONNX (fp32; int8 with --quantize int8)")
    p.add_argument("run_dir")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="the only format: ONNX")
    p.add_argument("--quantize", choices=QUANTIZATIONS, help="also write an int8 model (static QDQ quantization, "
                   "per-channel weights), measured against fp32 on the run's test split")
    p.add_argument("--calibration", metavar="DIR", help="images to calibrate int8 on (default: the run's "
                   "training images)")
    p.add_argument("--out", metavar="FILE", help="file to write (default RUN_DIR/model.onnx, with --quantize "
                   "int8 RUN_DIR/model.int8.onnx)")
    return p


def _add_backbones(sub) -> argparse.ArgumentParser:
    return sub.add_parser("backbones", help="list the registered backbones")


def _add_experiment(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("experiment", help="train a grid of runs, compare them, write results and report.html")
    p.add_argument("data_dir", help="class-per-subfolder image tree, or a study .toml file")
    p.add_argument("--out", help="experiment folder (required unless the .toml names it)")
    p.add_argument("--strategies", help=f"comma-separated: {','.join(STRATEGIES)}")
    p.add_argument("--optimizers", help=f"comma-separated: {','.join(OPTIMIZERS)}")
    p.add_argument("--heads", help="comma-separated head specs: 128,512x128,0")
    p.add_argument("--backbones", help="comma-separated backbones (default: efficientnet_lite0)")
    p.add_argument("--seeds", help="comma-separated seeds; each configuration is repeated per seed")
    p.add_argument("--eval-on", nargs="+", action="extend", metavar="DATA_DIR",
                   help="also evaluate every run on these folders (classes matched by name)")
    p.add_argument("--class-map", help="for --eval-on: JSON object (inline or file): dataset class -> model class")
    p.add_argument("--question", help="the study's question, shown at the top of the report")
    p.add_argument("--no-audit", dest="audit", action="store_false", default=None,
                   help="skip the data audit (EXP_DIR/audit/, a section of report.html)")
    p.add_argument("--time-limit", type=_duration, metavar="DURATION",
                   help="e.g. 1h: no run starts that would not end in time, a running one stops cleanly; the rest "
                        "are trained when the same command runs again")
    p.add_argument("--shard", metavar="K/N",
                   help="train only worker K's share of the grid (K = 1..N; a stable split by run hash) in a shared "
                        "EXP_DIR; the last worker to finish writes the results (or: transferlab report EXP_DIR)")
    _add_track_option(p, "EXP_DIR/tensorboard/<run>; mlflow: sqlite:///EXP_DIR/mlruns.db, one MLflow experiment, "
                         "a run per grid entry")
    _add_train_options(p, skip=("--strategy", "--optimizer", "--head", "--backbone", "--seed", "--time-limit"))
    return p


def _add_report(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="re-render EXP_DIR/report.html (and results.*) from the results on disk")
    p.add_argument("exp_dir")
    return p


def _add_audit(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="audit an image folder: mislabelled images, duplicates, how many more "
                       "images, data health (audit.html)")
    p.add_argument("data_dir", help="class-per-subfolder image tree (train/val/test layouts too)")
    p.add_argument("--out", default="audit", help="audit folder to write (default: ./audit)")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold heads that score every image (5)")
    for name, kwargs in (("--test-dir", {}), ("--labels", {"metavar": "FILE.csv"}),
                         ("--backbone", {"help": "default: efficientnet_lite0"}), ("--weights", {}),
                         ("--image-size", {"type": int}), ("--seed", {"type": int}),
                         ("--precision", {"choices": PRECISIONS}), ("--device", {"choices": DEVICES}),
                         ("--engine", {"choices": ENGINES}), ("--cache-dir", {})):
        p.add_argument(name, default=argparse.SUPPRESS, **kwargs)
    return p


@contextlib.contextmanager
def _command_logging(quiet: bool):
    """Log lines to the current stderr while a command runs; put the logger and progress setting back
    afterwards, so calling main() in-process (tests, notebooks) leaves no global state behind."""
    from . import progress

    saved = log.handlers[:], log.level, log.propagate, progress.bars_quiet()
    progress.set_quiet(quiet)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
        progress.set_quiet(saved[3])


def _summary(metrics: dict) -> str:
    low, high = metrics["accuracy_ci95"]
    parts = [f"accuracy {metrics['accuracy']:.4f} (95% CI {low:.3f}-{high:.3f})",
             f"precision {metrics['precision']:.4f}", f"recall {metrics['recall']:.4f}", f"f1 {metrics['f1']:.4f}"]
    if metrics.get("roc_auc") is not None:
        parts.append(f"roc_auc {metrics['roc_auc']:.4f}")
    return ", ".join(parts) + f" on {metrics['n_test']} test images" + _trust_summary(metrics)


def _trust_summary(metrics: dict) -> str:
    """The trust layer's figures on the same images (empty without one)."""
    if "calibration" not in metrics:
        return ""
    c, u, s = metrics["calibration"], metrics["unknown"], metrics["prediction_sets"]
    lines = [f"calibrated: temperature {c['temperature']:.3f}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}",
             f"unknown: {100 * u['known_kept']:.1f}% of these images kept as known (threshold set to keep "
             f"{100 * u['keep_known']:.0f}%)",
             f"prediction sets at {100 * s['coverage']:.0f}%: coverage {s['empirical_coverage']:.3f}, mean size "
             f"{s['mean_set_size']:.2f}"]
    if "auroc" in u:
        lines.append(f"--unknown {u['unknown_dir']}: {100 * u['unknown_flagged']:.1f}% of {u['n_unknown']} images "
                     f"flagged, AUROC {u['auroc']:.4f}")
    return "".join(f"\n{line}" for line in lines)


def cmd_train(args: argparse.Namespace) -> int:
    from .api import train
    from .config import TrainConfig
    from .errors import TransferlabError
    from .io.files import read_json
    from .io.rundir import RUN_FILES, RunDir

    options = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and k != "data_dir"}
    config = None
    if args.config:
        saved = read_json(args.config)
        if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
            raise TransferlabError(f"--config {args.config}: not a transferlab run config.json")
        config = TrainConfig.from_dict(saved["train"])
    elif not args.data_dir:
        raise TransferlabError("train: give DATA_DIR, or --config RUN_DIR/config.json")
    run = train(args.data_dir, out=args.out, config=config, resume=args.resume, track=args.track, **options)
    if run is None:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    auto = RunDir(run.directory).auto
    if auto.is_file():
        record = read_json(auto)
        print(f"auto chose {record['chosen']}: {record['reason']} (every candidate: {auto.with_suffix('.md')})")
    print(_summary(run.metrics))
    print(f"run directory: {run.directory}  ({', '.join(RUN_FILES)})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import evaluate

    metrics = evaluate(args.run_dir, args.data_dir, out=args.out, class_map=args.class_map, strict=args.strict,
                       tta=args.tta, engine=args.engine, unknown_dir=args.unknown)
    print(_summary(metrics))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .api import load_predictor
    from .prediction import csv_header, csv_line

    predictor = load_predictor(args.run_dir, precision=args.precision, device=args.device, engine=args.engine,
                               tta=args.tta)
    rows = predictor.iter_predictions(args.inputs, top_k=args.top_k, batch_size=args.batch_size)
    top_k = min(args.top_k, len(predictor.classes))
    trusted = predictor.trust is not None
    if args.format == "csv":
        print(",".join(csv_header(top_k, trusted)), flush=True)
    failed, kept = 0, []
    for row in rows:
        failed += "error" in row
        print(csv_line(row, top_k, trusted) if args.format == "csv" else json.dumps(row, ensure_ascii=False),
              flush=True)
        if args.gradcam:
            kept.append(row)
    if args.gradcam:
        from .api import explain_images

        written = explain_images(args.run_dir, kept, args.gradcam)
        log.info("Grad-CAM: %d heat map(s) in %s", len(written), args.gradcam)
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .api import serve

    serve(args.run_dir, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          batch_size=args.batch_size, queue_size=args.queue_size, explain=args.explain, cors_origins=args.cors)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .api import export

    result = export(args.run_dir, args.out, quantize=args.quantize, calibration=args.calibration)
    print(f"fp32: {result.files['fp32']}")
    if result.int8 is not None:
        m = result.int8
        print(f"int8: {result.files['int8']} (calibrated on {m['calibration']['images']} images)")
        if m["agreement"] is None:
            print(f"int8: {m['note']}")
        else:
            fp32, int8 = m["images_per_s"]["fp32"], m["images_per_s"]["int8"]
            print(f"int8: top-1 agreement with fp32 {m['agreement']:.2%} on {m['n_images']} test images; "
                  f"{fp32} images/s fp32, {int8} images/s int8 ({m['speedup']}x)")
            if int8 <= fp32:
                print("int8: not faster than fp32 on this CPU: ship the fp32 model unless size matters")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from .models.backbones import describe_backbones

    for name, description in describe_backbones().items():
        print(f"{name:22s} {description}")
    print("plus torchvision classification models by name (vgg16, resnet50, mobilenet_v2, ...) and timm/NAME")
    return 0


GRID_ARGS = ("strategies", "optimizers", "heads", "backbones", "seeds", "eval_on", "class_map", "question", "audit",
             "time_limit")


def cmd_experiment(args: argparse.Namespace) -> int:
    from .api import run_experiment
    from .config import TrainConfig
    from .experiment.spec import command_line
    from .experiment.study import load_study
    from .io.expdir import TEST, ExperimentDir

    kwargs: dict = {"options": {}}
    if args.data_dir.endswith(".toml"):
        kwargs = load_study(args.data_dir)
    else:
        kwargs["data_dir"] = args.data_dir
    given = vars(args)
    for name in GRID_ARGS:  # the command line overrides the study file
        if given.get(name) is not None:
            kwargs[name] = given[name]
    if args.out:
        kwargs["out"] = args.out
    options = {k: v for k, v in given.items() if k in TrainConfig.field_names() and k != "data_dir"}
    if "epochs" in options:
        kwargs["epochs"] = options.pop("epochs")
    kwargs["options"] = {**kwargs.get("options", {}), **options}
    # experiment.json records the command that makes the whole grid: without this worker's --shard
    argv = _without_option(getattr(args, "argv", sys.argv[1:]), "--shard")
    result = run_experiment(command=command_line(argv), shard=args.shard, track=args.track, **kwargs)
    if result.waiting:
        print(f"shard {result.shard}: {result.trained} run(s) trained, {result.skipped} skipped; {result.waiting} "
              f"run(s) of other shards not finished: the last worker writes the results (or: transferlab report "
              f"{result.directory})")
        return 0
    best = result.best
    if best:
        m = best["datasets"][TEST]
        print(f"selected by {result.results['selection_by']}: {best['label']} ({best['name']}): "
              f"test {_summary(m)}")
    print(f"{result.trained} run(s) trained, {result.skipped} skipped (finished earlier)"
          + (f", {result.not_started} not started (time limit)" if result.not_started else ""))
    exp = ExperimentDir(result.directory)
    print(f"results: {exp.results_csv}, {exp.results_markdown.name}; report: {result.report}")
    return 0


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from .api import render_report

    print(f"report: {render_report(args.exp_dir)}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .api import audit
    from .config import TrainConfig

    options = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and k != "data_dir"}
    result = audit(args.data_dir, out=args.out, folds=args.folds, **options)
    record = result.record
    issues, dups, curve = record["label_issues"], record["duplicates"], record["learning_curve"]
    print(f"label issues: {issues['flagged']} flagged of {issues['scored']} scored images "
          f"(out-of-fold accuracy {issues.get('out_of_fold_accuracy', 0):.4f})")
    print(f"duplicates: {dups['n_groups']} group(s) ({dups['n_exact']} exact, {dups['n_near']} near; "
          f"{dups['n_conflicts']} with conflicting labels, {dups['n_cross_split']} across splits)")
    if curve["fitted"]:
        print(f"learning curve: accuracy {curve['accuracy_now']:.4f} at {curve['per_class_now']:.0f} images per class; "
              f"expected {curve['at_2x']['accuracy']:.4f} at twice as many")
    else:
        print(f"learning curve: {curve['reason']}")
    findings = [f"{c['count']} {c['check']}" for c in record["health"]["checks"] if c["finding"]]
    print(f"health: {', '.join(findings) or 'no findings'}; {len(record['health']['unreadable'])} unreadable")
    print(f"audit: {result.page} ({record['seconds']:.1f}s)")
    return 0


COMMANDS = {"audit": cmd_audit, "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "export": cmd_export,
            "serve": cmd_serve,
            "backbones": cmd_backbones,
            "experiment": cmd_experiment, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded by `experiment`
    from .errors import TrainingInterrupted, TransferlabError

    try:
        with _command_logging(getattr(args, "quiet", False)):
            return COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        print(f"transferlab: {exc}", file=sys.stderr)
        return 130
    except TransferlabError as exc:
        print(f"transferlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transferlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
