"""The core's names the nodes use, imported in one place, whether the pack runs inside ComfyUI or in the tests.

Inside ComfyUI the repository root is loaded as a package (named by its folder
path) and the core is its subpackage `..infvsr_core`: the root is not on
`sys.path` there, and a second installed copy of the pack must not share our
core. In the tests `nodes` is a top-level package beside `infvsr_core`.
"""

# ruff: noqa: F401 - this module exists to re-export
from __future__ import annotations

if __package__ and "." in __package__:
    from ..infvsr_core import attention, loader, memory
    from ..infvsr_core.derived import release_derived
    from ..infvsr_core.download import download_weights
    from ..infvsr_core.errors import VideoError, WeightFileError
    from ..infvsr_core.evaluate import report as evaluation_report
    from ..infvsr_core.evaluate.run import EvaluateOptions, evaluate
    from ..infvsr_core.film import Film, FilmProgress, frames_to_read
    from ..infvsr_core.io import BackgroundWriter, VideoReader, VideoWriter, probe, unfinished_outputs
    from ..infvsr_core.io import audio as core_audio
    from ..infvsr_core.io.formats import FORMATS
    from ..infvsr_core.io.outputs import remove_stale_temps
    from ..infvsr_core.loader import WEIGHT_FILES, WEIGHT_SUFFIXES
    from ..infvsr_core.pipeline import InfVSRPipeline
    from ..infvsr_core.session import InfVSRSession, SceneState
    from ..infvsr_core.vae import SEAMS
else:
    from infvsr_core import attention, loader, memory
    from infvsr_core.derived import release_derived
    from infvsr_core.download import download_weights
    from infvsr_core.errors import VideoError, WeightFileError
    from infvsr_core.evaluate import report as evaluation_report
    from infvsr_core.evaluate.run import EvaluateOptions, evaluate
    from infvsr_core.film import Film, FilmProgress, frames_to_read
    from infvsr_core.io import BackgroundWriter, VideoReader, VideoWriter, probe, unfinished_outputs
    from infvsr_core.io import audio as core_audio
    from infvsr_core.io.formats import FORMATS
    from infvsr_core.io.outputs import remove_stale_temps
    from infvsr_core.loader import WEIGHT_FILES, WEIGHT_SUFFIXES
    from infvsr_core.pipeline import InfVSRPipeline
    from infvsr_core.session import InfVSRSession, SceneState
    from infvsr_core.vae import SEAMS
