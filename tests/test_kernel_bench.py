"""The kernel benchmark harness itself (kernels/bench.py), on a CPU."""

import torch

from kernels import bench


def test_more_compiled_cases_than_dynamos_recompile_limit():
    """Every case gets a fresh compile of the same reference: without a reset, the 9th case of one op hit
    Dynamo's recompile limit (8) and fullgraph=True turned that into an error, ending the whole run."""
    limit = torch._dynamo.config.recompile_limit
    cases = [bench._at_case(f"c{i}", [(1, 2, 2 + i, 2 + i)], [(1, 3, 2 + i, 2 + i)]) for i in range(limit + 1)]
    rows = bench.run(cases, ["eager", "compile"], ["forward"], ["fp32"], torch.device("cpu"), 0.001, log=lambda _: None)
    assert len(rows) == 2 * len(cases) and all(r.check == "ok" for r in rows)
    # every row holds a time that was measured (a case that did not run would have none, or inf)
    assert all(0 < r.median_ms < float("inf") for r in rows)
    assert {r.provider for r in rows} == {"eager", "compile"} and len({r.case for r in rows}) == len(cases)


def test_rows_report_bytes_and_launches_per_call():
    """Two AT pairs through the triton provider (the interpreter on a CPU): the row says how many Triton
    launches one call made (2 forward, 1 backward, 3 both, for all pairs together) and the MB it models;
    the CUDA-only columns stay empty on a CPU."""
    from kernels._dispatch import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        import pytest

        pytest.skip("the triton provider needs a GPU or TRITON_INTERPRET=1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = bench._at_case("two pairs", [(2, 3, 4, 4), (2, 5, 6, 6)], [(2, 4, 2, 2), (2, 6, 6, 6)])
    rows = bench.run([case], ["eager", "triton"], ["forward", "backward", "full"], ["fp32"], device, 0.001, log=lambda _: None)
    by_key = {(r.provider, r.mode): r for r in rows}
    assert all(r.check == "ok" for r in rows)
    assert {mode: by_key[("triton", mode)].launches_per_call for mode in ("forward", "backward", "full")} == {
        "forward": 2, "backward": 1, "full": 3}
    assert by_key[("eager", "forward")].launches_per_call is None
    student_bytes = 4 * (2 * 3 * 4 * 4 + 2 * 5 * 6 * 6)
    teacher_bytes = 4 * (2 * 4 * 2 * 2 + 2 * 6 * 6 * 6)
    assert by_key[("triton", "forward")].mb_moved == (student_bytes + teacher_bytes) / 1e6
    assert by_key[("triton", "backward")].mb_moved == 2 * student_bytes / 1e6
    if device.type == "cpu":
        assert all(r.graph_median_ms is None for r in rows)
    table = bench.markdown_table(rows)
    assert table.splitlines()[0].count("|") == table.splitlines()[2].count("|")
