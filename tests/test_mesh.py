"""The ranks' layout over (pp, dp, tp): sizes, coordinates, data shares, and bad worlds."""

import pytest

from bigmodel_cli.config import ParallelConfig
from bigmodel_cli.engine.mesh import Layout, data_share, layout_for
from bigmodel_cli.errors import UserError

pytestmark = pytest.mark.unit


def test_data_parallelism_fills_what_tensor_and_pipeline_leave():
    assert layout_for(8, ParallelConfig(tp=2, pp=2)) == Layout(dp=2, tp=2, pp=2)
    assert layout_for(4, ParallelConfig(tp=2)) == Layout(dp=2, tp=2, pp=1)
    assert layout_for(1, ParallelConfig()) == Layout()


def test_ranks_are_row_major_over_pp_dp_tp_and_tp_neighbours_read_the_same_data():
    layout = Layout(dp=2, tp=2, pp=2)
    coords = [layout.coordinates(r) for r in range(8)]
    assert [(c.pp, c.dp, c.tp) for c in coords] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                                                    (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    shares = [data_share(layout, r) for r in range(8)]
    assert [s.rank for s in shares] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert {s.world_size for s in shares} == {2}
    assert data_share(None, 5).world_size == 1


@pytest.mark.parametrize("world, tp, pp, expect", [(3, 2, 1, "e.g. 4 ranks"), (1, 2, 1, "e.g. 2 ranks"),
                                                   (6, 2, 2, "e.g. 8 ranks")])
def test_a_world_that_does_not_factor_is_one_line_with_a_world_that_would(world, tp, pp, expect):
    with pytest.raises(UserError) as err:
        layout_for(world, ParallelConfig(tp=tp, pp=pp))
    message = str(err.value)
    assert "\n" not in message and f"tp={tp}" in message and f"pp={pp}" in message and expect in message
