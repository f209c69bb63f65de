"""What the entry point does before and around Hydra: argv clean-up, one-line errors, run dir."""

from __future__ import annotations

import datetime
import os
import re
import sys
from typing import NoReturn

from omegaconf import DictConfig

from distlocal.errors import ConfigError

_LOCAL_RANK = re.compile(r"^--local[_-]rank(=\d+)?$")


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` the deepspeed launcher appends (Hydra rejects it).

    The launcher also sets ``LOCAL_RANK`` in the environment, which is what we read.
    """
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if _LOCAL_RANK.match(a):
            skip = "=" not in a  # "--local_rank 0" form: drop the value too
            continue
        out.append(a)
    return out


def overrides_of(argv: list[str]) -> list[str] | None:
    """The plain ``key=value`` overrides of argv, or ``None`` when Hydra flags make a pre-check moot."""
    if any(a in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-c", "--cfg") or
           a.startswith(("--cfg=", "--info=")) for a in argv):
        return None
    return [a for a in argv if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra"))]


def explain(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error."""
    from hydra.errors import MissingConfigException

    msg = str(exc)
    if isinstance(exc, MissingConfigException):
        m = re.search(r"Could not find '([^']+)/([^'/]+)'", msg)
        if m:
            group, name = m.groups()
            return f"unknown {group} '{name}'; valid: {', '.join(group_options(group))}"
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first += " — " + str(cause).strip().splitlines()[0]
    if "is not in struct" in first:
        first += " (check the spelling; `python launch/train.py --cfg job` lists every key)"
    return first


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (``data``, ``engine``, ...): its YAML files in ``configs/``.

    Read from the config tree itself, not from Hydra's error text, which also lists the search
    path; the schema entries (``base_*``) are not options a user picks.
    """
    from distlocal.config import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("base_"))


def die(message: str, code: int = 2, every_rank: bool = False) -> NoReturn:
    """Print ``distlocal: error: <message>`` on one line to stderr and exit with ``code``.

    ``every_rank``: every rank of a process group raised this error at the same point, so they
    leave together (:func:`distlocal.parallel.env.exit_together`) and each exits ``code``.
    """
    # One write of the whole line: under torchrun every rank shares the terminal, and print()'s
    # separate write of the newline let two ranks' lines run together.
    sys.stderr.write(f"distlocal: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    if every_rank:
        from distlocal.parallel.env import exit_together

        exit_together(code)
    sys.exit(code)


def precheck(argv: list[str]) -> DictConfig | None:
    """Compose and validate the config once before Hydra runs, so a bad key is one line and
    nothing is written; returns it (``None`` when Hydra flags such as ``-m`` or ``--cfg`` make the
    pre-check moot)."""
    overrides = overrides_of(argv)
    if overrides is None:
        return None
    from distlocal.config import compose
    from distlocal.validation import validate

    try:
        cfg = compose(overrides)
    except Exception as exc:  # Hydra raises several exception types; all become one line
        die(explain(exc))
    try:
        validate(cfg)
        from distlocal.data import check_root

        check_root(cfg.data)  # a missing data root, too, before Hydra writes the run directory
    except ConfigError as exc:
        die(str(exc))
    return cfg


def agreed_run_dir(argv: list[str], cfg: DictConfig | None) -> list[str]:
    """Under several ranks, make every rank use rank 0's run directory.

    Hydra's default run dir embeds the time, which differs between ranks started a second
    apart; rank 0 picks it and the others receive it through the process group, which is
    joined here with the run's own device, backend and timeout (``train`` then reuses it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    if cfg is None:  # multirun, --cfg, --help: no single run directory to agree on
        return argv
    from distlocal.parallel.env import broadcast_object, init_distributed

    env = init_distributed(cfg.trainer.device, cfg.engine.backend, cfg.engine.timeout_s)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    stamp = broadcast_object(stamp, env)
    return [*argv, f"hydra.run.dir=outputs/{stamp}"]
