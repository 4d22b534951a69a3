"""CalibConfig (qvlquant/calib/config.py; tests/test_config.py is the job config's): the sequence and pixel budgets."""

import pytest

from qvlquant.calib.config import MAX_PIXELS_CEILING, CalibConfig
from qvlquant.cli import main


def test_pixel_budgets_have_a_ceiling():
    """qwen-vl-utils' own maximum (16384 * 28 * 28 pixels, 16384 visual tokens); 1e8-1e9 pixels ran out of memory."""
    assert MAX_PIXELS_CEILING == 16384 * 28 * 28
    assert CalibConfig(min_pixels=MAX_PIXELS_CEILING, max_pixels=MAX_PIXELS_CEILING).max_pixels == MAX_PIXELS_CEILING
    for kw in ({"max_pixels": 10 ** 9}, {"min_pixels": 10 ** 8, "max_pixels": 10 ** 9}, {"max_pixels": MAX_PIXELS_CEILING + 1}):
        with pytest.raises(ValueError, match=rf"max_pixels must be at most {MAX_PIXELS_CEILING} \(16384 \* 28 \* 28, "
                                             r"qwen-vl-utils' maximum\)"):
            CalibConfig(**kw)


@pytest.mark.parametrize("flags", [["--max-pixels", "1000000000"], ["--min-pixels", "100000000", "--max-pixels", "1000000000"]])
def test_pixel_flags_over_the_ceiling_exit_2(tmp_path, capsys, flags):
    assert main(["quantize", *flags, "--output", str(tmp_path / "o")]) == 2
    assert "max_pixels must be at most 12845056" in capsys.readouterr().err and not (tmp_path / "o").exists()
