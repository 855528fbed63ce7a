"""One module per command: config in, result out. Each exposes a Hydra `main`.

A command's module is imported before Hydra has parsed argv and before its stop-signal
handlers are in place, so it imports torch-side modules (the builder, the engine) inside the
functions that run the command: `--help` answers without torch, and a Ctrl-C during torch's
import of several seconds is handled as a stop, not a traceback.
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The Hydra config tree: bigmodel_cli/conf in a wheel, ../conf in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"bigmodel's config tree is missing (looked in {package}/conf and "
                       f"{package.parent}/conf); reinstall the package")


CONFIG_DIR = config_dir()

# conf/hydra/bigmodel.yaml names the default run dir through one, hydra/sweeper=optuna its
# direction through the other (before any command runs).
from bigmodel_cli import slurm, sweepers  # noqa: E402

slurm.register_resolver()
sweepers.register_resolver()
