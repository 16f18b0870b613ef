"""Experiment tracking: train.py's numbers where people watch runs, TensorBoard or Weights & Biases.

    TRACKER=tensorboard uv run --extra tensorboard train.py     # then: uvx tensorboard --logdir log
    TRACKER=wandb WANDB_PROJECT=mine uv run --extra wandb train.py

Rank 0 sends, under metrics.csv's column names and step numbers: every update's row (loss, lr,
norm, dt_ms, tok_per_sec, mfu, peak_mem_mib; val_loss and hellaswag_acc where measured), the
samples as text (with the row of their step, so that a step W&B holds is always a whole one), and
at the start the run's settings and parameter count. Neither package is in the default install:
each is an extra of pyproject.toml (and in the dev group, which `uv run` in a checkout installs).

A run that resumes continues its curves. TensorBoard's are cut at the first replayed step
(purge_step), so a step is never shown twice. W&B drops every step at or below the last one a run
holds: a run resumes as the same W&B run (its id is kept in the checkpoints) only when nothing is
replayed; after a crash that lost the newest checkpoint, the replayed updates go to a new W&B run
in the same group, named after the first with "from step N", so that no step disappears.

The tracker is never a reason to lose an update or a checkpoint: whatever fails in it (a full disk,
the network, a bug in the package) is one warning, and training goes on without it.
"""

import importlib.util
import os
import re
import secrets
import string
import sys
import threading
from urllib.parse import urlparse

import hub
from env import UserError, reason

TRACKERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # the package each needs
WANDB_PROBE_SECONDS = 3  # the longest W&B may make a run wait to find it cannot reach its server
SECRET_WORDS = ("key", "secret", "password", "token")  # in no configuration sent


def check(tracker):
    """Stop before any work on a tracker that is not one, or whose package is missing."""
    if tracker not in TRACKERS:
        raise UserError(f"TRACKER must be {', '.join(TRACKERS)}, got {tracker!r}")
    package = TRACKERS[tracker]
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"TRACKER={tracker} needs the {package} package, which is not installed: run "
                        f"uv run --extra {tracker} train.py")


class Tracker:
    """Rank 0's link to a tracker (a TensorBoard or WandB below, or None: no tracker). The first
    failure is one warning; the tracker is off from then on."""

    def __init__(self, name="none", backend=None, run=None):
        self.name, self.backend = name, backend
        # what checkpoints keep to continue the W&B run: this one's, else the one the run resumed
        self.run = getattr(backend, "run_record", None) or run
        self.texts = None  # samples waiting for the row of their step

    def log(self, step, row):
        """Send metrics.csv's row of update `step` ({column: value}, None where not measured), and
        the samples made before it."""
        self.call("log", step, {column: value for column, value in row.items() if value is not None}, self.texts)
        self.texts = None

    def samples(self, texts):
        """Keep the samples made before an update, for its row."""
        self.texts = texts

    def flush(self):
        """Write out what is buffered: a checkpoint was just saved, and a crash now must lose no
        point before it."""
        self.call("flush")

    def close(self, error=None):
        """Finish: with `error` (the exception ending the run, if any), as failed or stopped."""
        code = 0 if error is None else error.code if isinstance(error, SystemExit) else 1
        self.call("close", code if isinstance(code, int) else 1)

    def call(self, method, *args):
        if self.backend is None:
            return
        try:
            getattr(self.backend, method)(*args)
        except Exception as error:  # whatever it is: training goes on
            self.backend = None
            print(f"Warning: TRACKER={self.name} failed ({type(error).__name__}: {reason(error)}): training goes on "
                  "without it (metrics.csv has every update)", file=sys.stderr, flush=True)


def start(tracker, log_dir, project, config, first_step, previous_run, continues):
    """Return rank 0's Tracker for a run whose first update is `first_step`.

    config: the settings and parameter count, sent as the run's configuration (nothing secret).
    previous_run: the W&B run a resumed checkpoint recorded, or None; continues: whether it can go
    on as that same run (no update is replayed)."""
    config = {name: value for name, value in config.items() if not any(word in name for word in SECRET_WORDS)}
    try:
        if tracker == "tensorboard":
            return Tracker(tracker, TensorBoard(log_dir, config, first_step), previous_run)
        if tracker == "wandb":
            return Tracker(tracker, WandB(log_dir, project, config, first_step, previous_run, continues))
    except Exception as error:
        print(f"Warning: TRACKER={tracker} could not start ({type(error).__name__}: {reason(error)}): training goes "
              "on without it (metrics.csv has every update)", file=sys.stderr, flush=True)
    return Tracker(run=previous_run)


class TensorBoard:
    """Event files in $LOG_DIR/tensorboard/."""

    def __init__(self, log_dir, config, first_step):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: the points an earlier run logged from first_step on are hidden (all of them for
        # a run that starts over at 0 in the same LOG_DIR)
        self.writer = SummaryWriter(os.path.join(log_dir, "tensorboard"), purge_step=first_step)
        table = "\n".join(["| setting | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in config.items()])
        self.writer.add_text("configuration", table, first_step)

    def log(self, step, row, texts):
        for column, value in row.items():
            self.writer.add_scalar(column, value, step)
        if texts:  # indented: a code block in TensorBoard's markdown, each text shown as it is
            self.writer.add_text("samples", "\n\n".join(f"    {text}".replace("\n", "\n    ") for text in texts), step)

    def flush(self):
        self.writer.flush()

    def close(self, code):
        self.writer.close()


class WandB:
    """A Weights & Biases run, its files under $LOG_DIR/wandb/. W&B's own variables (WANDB_MODE,
    WANDB_API_KEY, WANDB_BASE_URL, WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, ...) are read by W&B."""

    def __init__(self, log_dir, project, config, first_step, previous_run, continues):
        import wandb

        self.wandb = wandb
        offline = "WANDB_MODE" not in os.environ and why_offline()
        chosen = dict(project=project, dir=log_dir, config=config, settings=wandb.Settings(silent=True))
        if offline:
            chosen["mode"] = "offline"
        if previous_run and continues:  # the same run: nothing it holds is logged again
            chosen.update(id=previous_run["id"], resume="allow", group=previous_run["group"], name=previous_run["name"])
        elif previous_run:  # updates it holds would be replayed, and W&B would drop them: a new run beside it
            first = re.sub(r" from step \d+$", "", previous_run["name"])
            chosen.update(group=previous_run["group"], name=f"{first} from step {first_step}")
        else:
            chosen["id"] = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            if "WANDB_RUN_GROUP" not in os.environ:
                chosen["group"] = chosen["id"]  # the group its resumed parts will join
        self.run = wandb.init(**chosen)
        self.run_record = {"id": self.run.id, "group": self.run.group, "name": self.run.name or self.run.id}
        if self.run.offline:
            folder = os.path.relpath(os.path.dirname(self.run.dir))
            print(f"W&B: {offline or 'WANDB_MODE=' + os.environ['WANDB_MODE']}: logging offline; upload the run "
                  f"later with: uv run --extra wandb wandb sync {folder}", flush=True)

    def log(self, step, row, texts):
        if texts:
            row = {**row, "samples": self.wandb.Table(columns=["sample"], data=[[text] for text in texts])}
        self.run.log(row, step=step)

    def flush(self):
        pass  # W&B writes as it goes

    def close(self, code):
        if code == 143:  # SIGTERM: W&B shows the run as preempted, to be resumed
            self.run.mark_preempting()
        self.run.finish(exit_code=code)


def why_offline():
    """Return why W&B cannot be reached ("" if it can): no login, or no answer from its server
    within WANDB_PROBE_SECONDS."""
    import netrc

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(url).hostname
    try:
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        return "not logged in (wandb login, or WANDB_API_KEY)"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""  # through a proxy: W&B's own connection is the only test
    answer = []  # the probe in a thread: a name lookup that hangs must not hold the run up either
    probe = threading.Thread(target=lambda: answer.append(hub.answers(url, WANDB_PROBE_SECONDS)), daemon=True)
    probe.start()
    probe.join(WANDB_PROBE_SECONDS)
    return "" if answer and answer[0] else f"{host} cannot be reached"
