"""`gte-jax` command line: one entry point, one module per subcommand.

Each subcommand's argument parsing lives in ``gte_jax/commands/<name>.py`` (``data``: in
``gte_jax/data/cli.py``) and exposes ``main(argv) -> int``; this file only dispatches, so
`gte-jax encode --help` imports nothing the encoder does not need.
"""

from __future__ import annotations

import importlib
import logging
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gte_jax.commands.train", "train a model (any stage) from a config"),
    "export": ("gte_jax.commands.export", "write a Hugging Face / sentence-transformers directory"),
    "encode": (
        "gte_jax.commands.encode",
        "embed texts from a .txt or .jsonl file into a .npy array",
    ),
    "eval": ("gte_jax.commands.evaluate", "retrieval (BEIR format) and STS evaluation"),
    "mine": ("gte_jax.commands.mine", "mine hard negatives for stage-2 fine-tuning"),
    "data": ("gte_jax.data.cli", "inspect the data mixture, build TFDS datasets"),
    "synth": (
        "gte_jax.commands.synth",
        "synthetic training data from an LLM endpoint (E5-mistral's recipe)",
    ),
    "plan": (
        "gte_jax.commands.plan",
        "per-chip memory, fit and time of a config on a TPU topology",
    ),
}


_COMPILES = {"train", "export", "encode", "eval", "mine"}
# Commands whose process never runs torch (``eval`` is not one: the MTEB adapter imports mteb and
# sentence-transformers, which need transformers' torch side).
_TORCHLESS = {"train", "export", "encode", "mine", "plan"}


def _keep_torch(value: str) -> bool:
    """GTE_JAX_TRANSFORMERS_TORCH: 1 / true / yes lets torch in; unset, empty, 0 / false / no keep
    it out; anything else is refused (a misspelt opt-out must not silently do the opposite)."""
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("", "0", "false", "no"):
        return False
    raise ValueError(f"GTE_JAX_TRANSFORMERS_TORCH={value!r}: use 1 (let torch in) or 0")


def _without_torch() -> bool:
    """Keeps torch out of a CLI process that never runs it; returns whether it did.

    gte-jax computes with JAX and reads safetensors only (pickled ``*.bin`` checkpoints are
    refused), yet libraries it imports load torch whenever torch is installed, as it is beside
    sentence-transformers: ``import transformers`` (``configuration_utils`` ->
    ``modeling_rope_utils``) and tensorboardX (for an ``isinstance`` check). That costs ~2 s of
    start-up and ~1 s more at exit on a 2-core machine (measured on a fine-tune's whole process).
    ``sys.modules["torch"] = None`` makes ``import torch`` fail as if torch were absent, and
    transformers' ``is_torch_available()`` (``find_spec``) answer False; both take their non-torch
    paths (tokenizers, configs). Not done when torch or transformers is already imported, with
    GTE_JAX_TRANSFORMERS_TORCH=1, or for a caller running ``main([...])`` in its own process."""
    import os

    if _keep_torch(os.environ.get("GTE_JAX_TRANSFORMERS_TORCH", "")):
        return False
    if "torch" in sys.modules or "transformers" in sys.modules:
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]
    # transformers advises at import that "PyTorch was not found": expected here, so unsaid.
    advisory = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        import transformers  # noqa: F401
    finally:
        if advisory is None:
            os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = advisory
    return True


def _enable_compilation_cache() -> None:
    """Persist XLA executables across runs (a resumed or repeated run skips its compiles, which
    cost 5-20 s per shape on a CPU). GTE_JAX_COMPILATION_CACHE=DIR moves it; empty turns it off."""
    import os

    default = os.path.join(os.path.expanduser("~"), ".cache", "gte_jax", "xla")
    path = os.environ.get("GTE_JAX_COMPILATION_CACHE", default)
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)


class _QuietBackendProbe(logging.Filter):
    """Drops JAX's INFO line "Unable to initialize backend 'tpu': ... libtpu.so ..." that every
    run prints on a machine without a TPU (JAX probes each backend it knows when JAX_PLATFORMS is
    unset). Kept: that line when a TPU is visible (the reason it went unused), and everything
    else: a backend that was asked for and fails raises, and JAX warns by itself when it falls
    back to the CPU beside a TPU or a GPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno > logging.INFO or not message.startswith(
            "Unable to initialize backend 'tpu'"
        ):
            return True
        try:
            from jax._src import hardware_utils

            return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
        except Exception:  # JAX internals moved: keep the line rather than guess
            return True


def _skip_absent_tpu() -> bool:
    """Sets JAX_PLATFORMS=cpu for this process when it is unset and no accelerator is attached;
    returns whether it did.

    With JAX_PLATFORMS unset JAX initialises every backend it knows to find the default one, and
    the TPU backend loads libtpu (installed by ``[test]`` and ``[tpu]``), whose C++ start-up
    writes "Failed to find host bounds ..." and "unexpected worker hostname ..." straight to the
    process's stderr on a machine without a TPU: no logging filter or log-level variable reaches
    it, only not loading it does. The test for a TPU is JAX's own (``cloud_tpu_init``: Google TPU
    chips on the PCI bus), so a TPU VM keeps JAX's default and finds its TPU; a visible NVIDIA or
    AMD GPU keeps it too (the GPU plugins decide there). JAX_FORCE_TPU_INIT keeps it as well."""
    import os

    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    try:
        from jax._src import hardware_utils

        tpu_chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
        nvidia = hardware_utils.has_visible_nvidia_gpu()
    except Exception:  # JAX internals moved: leave JAX's default rather than guess
        return False
    if tpu_chips or nvidia or os.path.exists("/dev/kfd"):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # read at import: a later change goes through the config
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def _quiet_backend_probe() -> None:
    probe = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _QuietBackendProbe) for f in probe.filters):
        probe.addFilter(_QuietBackendProbe())


def _usage() -> str:
    lines = ["usage: gte-jax <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `gte-jax <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a usage error: usage on stderr, like an unknown command
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from gte_jax import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"gte-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    _quiet_backend_probe()
    if command_line:
        _skip_absent_tpu()
    if command_line and name in _TORCHLESS:
        try:
            _without_torch()
        except ValueError as e:
            print(f"gte-jax: {e}", file=sys.stderr)
            return 2
    if "-h" not in rest and "--help" not in rest:
        from gte_jax import tpu_flags

        tpu_flags.apply()  # before libtpu starts: train and plan build the same TPU program
    if name in _COMPILES and "-h" not in rest and "--help" not in rest:
        _enable_compilation_cache()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
