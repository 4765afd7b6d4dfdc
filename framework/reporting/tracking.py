"""Run files and wandb, on the main process only.

`output.dir` gets `recipe.yaml` (the resolved recipe), `metrics.jsonl` (one record per epoch, and
with `logging.interval_steps` one per interval, which has `update` and no `epoch`; the same keys
wandb gets) and `summary.json` (written last, atomically). wandb's step is the optimizer update
count; epoch records are plotted against `epoch`, interval records against `update`.
"""

from __future__ import annotations

import json
import netrc
import os
import re
from pathlib import Path

from framework.checkpoint.paths import redirect_tool_dirs, temp_beside
from framework.recipe.yaml_io import dump_yaml
from framework.reporting.intervals import STEP_PREFIX

SECRET_NAME = re.compile(r"(_KEY|_TOKEN|_SECRET|PASSWORD)$", re.I)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one."""
    tmp = temp_beside(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def scrub_secrets(data):
    """Drop any entry whose name looks like a secret (defence in depth: the schema has none)."""
    if isinstance(data, dict):
        return {k: scrub_secrets(v) for k, v in data.items() if not SECRET_NAME.search(str(k))}
    if isinstance(data, list):
        return [scrub_secrets(v) for v in data]
    return data


def wandb_api_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if wandb_api_key_available() else "offline"


class LoggerStartError(RuntimeError):
    """wandb asked for explicitly (mode online) could not start: the run stops before training, on every process."""


def create_logger(accelerator, *args) -> RunLogger | None:
    """The RunLogger on the main process (None elsewhere). Every process learns whether it started, so an
    explicit online mode that cannot start stops all of them at once with one line, not a lost peer each."""
    from accelerate.utils import broadcast_object_list

    logger, failure = None, [None]
    if accelerator.is_main_process:
        try:
            logger = RunLogger(*args)
        except LoggerStartError as err:
            failure = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(failure, from_process=0)
    if failure[0] is not None:
        raise LoggerStartError(failure[0])
    return logger


class RunLogger:
    """Writes the run's files and mirrors every record to wandb. Create on the main process only."""

    def __init__(self, out_dir: Path, recipe_dict: dict, wandb_cfg, run_name: str, records: list[dict],
                 updates_done: int = 0):
        """`records`: the epoch records a resumed run had logged up to its checkpoint, taken at `updates_done`
        optimizer updates. metrics.jsonl is rewritten to exactly those and the interval records up to there."""
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.config = scrub_secrets(recipe_dict)
        write_atomic(out_dir / "recipe.yaml", dump_yaml(self.config))
        self.metrics_path = out_dir / "metrics.jsonl"
        lines = sorted([*self._interval_lines(updates_done), *records], key=lambda r: (r.get("update", 0), "epoch" in r))
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in lines))
        self.mode = resolve_wandb_mode(wandb_cfg.mode)
        self.run = None
        if self.mode == "disabled":
            return
        redirect_tool_dirs(out_dir)
        try:
            self.run = self._init(wandb_cfg, run_name)
        except Exception as err:  # wandb raises CommError, AuthenticationError, UsageError...: none may end a run
            why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
            if wandb_cfg.mode != "auto":
                raise LoggerStartError(f"logging.wandb.mode = {wandb_cfg.mode!r}: wandb could not start ({why}); "
                                       "use 'auto' (falls back to offline) or 'offline'") from None
            print(f"note: wandb online could not start ({why}); logging offline instead: sync later with "
                  f"`wandb sync {out_dir / 'wandb'}/offline-run-*`", flush=True)
            self.mode = "offline"
            self.run = self._init(wandb_cfg, run_name)

    def _interval_lines(self, updates_done: int) -> list[dict]:
        """A resumed run's interval records up to its checkpoint; the updates after it are trained again."""
        if updates_done == 0 or not self.metrics_path.is_file():
            return []
        lines = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        return [r for r in lines if "epoch" not in r and r.get("update", updates_done + 1) <= updates_done]

    def _init(self, wandb_cfg, run_name: str):
        import wandb

        run = wandb.init(
            project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name or run_name,
            tags=wandb_cfg.tags, config=self.config, dir=str(self.out_dir), mode=self.mode,
            settings=wandb.Settings(save_code=False, console="off", silent=True, init_timeout=wandb_cfg.init_timeout),
        )
        run.define_metric("epoch")
        run.define_metric("update")
        run.define_metric(f"{STEP_PREFIX}*", step_metric="update")
        for prefix in ("train", "eval", "throughput", "amp", "memory", "time"):
            run.define_metric(f"{prefix}/*", step_metric="epoch")
        return run

    def log(self, record: dict) -> None:
        """An epoch record or an interval record (framework/reporting/intervals.py)."""
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.run is not None:
            self.run.log(record, step=record["update"])

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def interrupt(self) -> None:
        if self.run is not None:
            self.run.mark_preempting()
            self.run.finish(exit_code=143)

    def finish(self, summary: dict) -> None:
        write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.run is not None:
            self.run.summary.update(flatten(summary))
            self.run.finish()

    @property
    def wandb_dir(self) -> str | None:
        return str(Path(self.run.dir).parent.resolve()) if self.run is not None else None  # run.dir is its files/ folder


def flatten(data: dict, sep: str = "/", prefix: str = "") -> dict:
    """Nested dicts to one level: {"a": {"b": 1}} -> {"a/b": 1}, or "a.b" with sep="."."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[prefix + key] = value
    return out
