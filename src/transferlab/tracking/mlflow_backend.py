"""MLflow (the ``transferlab[mlflow]`` extra) through ``MlflowClient`` (no fluent API: it keeps an active run
in process-wide state). One MLflow experiment (an experiment folder's name, or ``transferlab`` for stand-alone
``train`` runs), one MLflow run per transferlab run, tagged ``transferlab.run`` = its name and with the tags the
caller gives (an experiment's grid axes). A run trained again after a kill continues its unfinished MLflow run
instead of opening a second one.

Server timeouts and retries are MLflow's own (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``): with its defaults an unreachable server costs minutes of retries before the
one warning; lower them to fail fast.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ..errors import TransferlabError
from ..io.lock import file_lock
from .records import FIGURES_PATH, FinalRecord, RunInfo

RUN_TAG = "transferlab.run"
_SQLITE = "sqlite:///"


class MlflowBackend:
    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise TransferlabError("--track mlflow needs the mlflow extra: pip install 'transferlab[mlflow]'") from None
        self.client = MlflowClient(tracking_uri=uri)
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self.label = f"mlflow ({uri})"
        self._experiment_id: str | None = None

    def _store_lock(self):
        """Two processes creating one SQLite database (its tables) at once fail; they take turns."""
        if self.uri.startswith(_SQLITE):
            database = Path(self.uri[len(_SQLITE):])
            return file_lock(database.with_name(database.name + ".lock"))
        return contextlib.nullcontext()

    def _experiment_id_or_create(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            with self._store_lock():  # (which also creates the database's folder)
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    try:
                        self._experiment_id = self.client.create_experiment(
                            self.experiment, artifact_location=self.artifact_location)
                    except MlflowException:  # another worker created it meanwhile
                        found = self.client.get_experiment_by_name(self.experiment)
                if found is not None:
                    self._experiment_id = found.experiment_id
        return self._experiment_id

    def _unfinished(self, experiment_id: str, name: str) -> str | None:
        """The MLflow run of an earlier, interrupted training of this run (None: start a new one)."""
        if "'" in name:
            return None
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{name}'",
                                       order_by=["attributes.start_time DESC"], max_results=20)
        return next((r.info.run_id for r in runs if r.info.status != "FINISHED"), None)

    def start(self, info: RunInfo) -> str:
        from mlflow.entities import Param, RunTag

        experiment_id = self._experiment_id_or_create()
        tags = {**info.tags, RUN_TAG: info.name}
        run_id = self._unfinished(experiment_id, info.name)
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=info.name, tags=tags).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        params = [Param(k, "None" if v is None else str(v)) for k, v in info.params.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(run_id, params=params[start:start + 100],
                                  tags=[RunTag(k, str(v)) for k, v in tags.items()] if start == 0 else [])
        return run_id

    def log_epoch(self, handle: str, step: int, metrics: dict[str, float]) -> None:
        self._log_metrics(handle, metrics, step)

    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, handle: str, final: FinalRecord) -> None:
        self._log_metrics(handle, final.metrics, 0)
        for path, name in final.figures:
            parent = Path(name).parent.as_posix()
            self.client.log_artifact(handle, str(path), FIGURES_PATH if parent == "." else f"{FIGURES_PATH}/{parent}")
        for path, folder in final.files:
            self.client.log_artifact(handle, str(path), folder)

    def end(self, handle: str, status: str) -> None:
        self.client.set_terminated(handle, status)
