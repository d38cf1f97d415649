"""The kernel benchmark harness itself (kernels/bench.py), on a CPU."""

import torch

from kernels import bench


def test_more_compiled_cases_than_dynamos_recompile_limit():
    """Every case gets a fresh compile of the same reference: without a reset, the 9th case of one op hit
    Dynamo's recompile limit (8) and fullgraph=True turned that into an error, ending the whole run."""
    limit = torch._dynamo.config.recompile_limit
    cases = [bench._at_case(f"c{i}", [(1, 2, 2 + i, 2 + i)], [(1, 3, 2 + i, 2 + i)]) for i in range(limit + 1)]
    rows = bench.run(cases, ["eager", "compile"], ["forward"], ["fp32"], torch.device("cpu"), 0.001, log=lambda _: None)
    assert len(rows) == 2 * len(cases) and all(r.check == "ok" and r.median_ms > 0 for r in rows)
