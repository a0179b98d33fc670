"""The one table of output formats: the command line and the node offer what it holds, and reading it is cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infvsr_core import cli
from infvsr_core.errors import VideoError
from infvsr_core.io.formats import CODECS, CONTAINERS, FORMATS, PRORES_PROFILES, format_for

ROOT = Path(__file__).resolve().parents[1]


def test_front_ends_offer_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The names users see: the node's formats, --codec and --prores-profile (with their defaults)."""
    assert list(FORMATS) == ["h264-mp4", "h265-mp4", "prores-422hq-mov", "prores-4444-mov", "ffv1-mkv", "png-sequence"]
    assert cli.CODECS == ("auto", "h264", "h265", "prores", "ffv1", "png") == ("auto", *CODECS)
    parser = cli.build_parser()

    def parse(*extra: str):
        return parser.parse_args(["upscale", "in.mp4", "-o", "out.mov", *extra])

    assert (parse().codec, parse().prores_profile) == ("auto", "hq")
    assert [parse("--codec", codec).codec for codec in cli.CODECS] == list(cli.CODECS)
    assert [parse("--prores-profile", p).prores_profile for p in PRORES_PROFILES] == ["hq", "4444"]
    with pytest.raises(SystemExit):
        parse("--codec", "vp9")
    assert "invalid choice: 'vp9'" in capsys.readouterr().err


def test_each_format_is_one_the_writer_takes() -> None:
    for name, fmt in FORMATS.items():
        assert format_for(fmt.codec, fmt.prores_profile) is fmt, name
        assert fmt.pix_fmt in fmt.pix_fmts, name
        assert fmt.extension == "" or CONTAINERS[f".{fmt.extension}"] == fmt.container, name
        assert fmt.uses_crf == (fmt.codec in ("h264", "h265")), name
    assert (format_for("h264").crf, format_for("h265").crf) == (18, 20)
    assert format_for("prores").prores_profile == "hq"
    with pytest.raises(VideoError, match="unknown codec 'vp9'; use one of h264, h265, prores, ffv1, png"):
        format_for("vp9")
    with pytest.raises(VideoError, match="unknown ProRes profile 'lt'; use 'hq' or '4444'"):
        format_for("prores", "lt")


def test_the_table_and_the_parser_import_nothing_heavy() -> None:
    """`--help` builds the parser from the table: neither may import torch or PyAV."""
    code = (
        "import sys; import infvsr_core.cli as cli; cli.build_parser(); "
        "heavy = [m for m in ('torch', 'av', 'numpy') if m in sys.modules]; assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
