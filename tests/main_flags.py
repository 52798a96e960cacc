"""Parse distill_jax.main arguments the way main.py does (its flags, a locked ml_collections
config with the overrides applied), for tests that check printed or documented commands."""

import re

from absl import flags
from ml_collections import config_flags

from distill_jax import main as entry  # noqa: F401  (defines main.py's flags on flags.FLAGS)

MAIN_FLAGS = {"config", "workdir", "mode", "coordinator_address", "num_processes", "process_id"}
MAIN_FLAGS |= {"distributed", "topology", "num_slices"}


def parse_main_flags(argv: list[str], config_dir: str = ""):
    """Parse main.py arguments as main.py does (its flags, a locked ml_collections config)."""
    names = {a[2:].split("=", 1)[0].split(".", 1)[0] for a in argv if a.startswith("--")}
    assert names <= MAIN_FLAGS and MAIN_FLAGS <= set(flags.FLAGS), names  # main.py's own flags
    if config_dir:  # a worker's copy of the config: read the repository's file instead
        argv = [re.sub(r"^--config=([^/:]+)", rf"--config={config_dir}/\1", a) for a in argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=fv, lock_config=True, sys_argv=["main", *argv]
    )
    for name in ("workdir", "mode", "coordinator_address", "topology"):
        flags.DEFINE_string(name, None, "", flag_values=fv)
    for name in ("num_processes", "process_id", "num_slices"):
        flags.DEFINE_integer(name, None, "", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "", flag_values=fv)
    fv(["main", *argv])
    return fv
