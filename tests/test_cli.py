"""The main job (`python -m comfyui_fast_samplers compare`) on a small budget."""
import pytest

from comfyui_fast_samplers.cli import SAMPLERS, format_tables, main, run_comparison


def test_compare_covers_every_entry_and_ranks_them_sensibly():
    results, floors = run_comparison(nfes=(5,), samples=4000, ode_samples=200, kinds=("ve",))
    rows = results["ve"]
    assert set(rows) == {entry.label for entry in SAMPLERS}
    for entry in SAMPLERS:
        ode_error, w2, mode_error = rows[entry.label][5]
        assert (ode_error is not None) == entry.deterministic and w2 > 0 and 0 <= mode_error <= 1
    assert rows["fs_er_sde_ode_3"][5][0] < 0.7 * rows["euler"][5][0]  # 3rd order vs 1st at NFE 5
    calibrated = next(e.label for e in SAMPLERS if e.calibrated)
    assert rows[calibrated][5][0] < 0.6 * rows["fs_er_sde_ode_3_unic"][5][0]  # measured 0.041 vs 0.159
    dpm_ot = next(e.label for e in SAMPLERS if e.junction is not None)
    assert rows[dpm_ot][5][1] < 0.5 * rows["euler"][5][1]  # starts in the modes: 0.083 vs 0.272 at NFE 5
    table = format_tables(results, floors, (5,))
    assert dpm_ot in table and f"{floors['ve']:.4f}" in table


def test_compare_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["compare", "--nfe", "1"])
