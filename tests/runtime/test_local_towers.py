"""The in-process towers' slots: handed out lowest first, so that the rows of a step stay side
by side in the pool after requests have come and gone in any order."""

from trt_twotower.runtime.local_towers import LocalTowers
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor


def test_the_lowest_free_slot_is_taken_first(tiny_model):
    towers = LocalTowers(TorchContextExecutor(tiny_model), TorchDenoiserExecutor(tiny_model),
                         tiny_model.config, capacity=6, max_context=16)
    assert [towers.new_ref() for _ in range(5)] == [0, 1, 2, 3, 4]
    towers.release([0, 3])
    towers.release([1])
    assert [towers.new_ref() for _ in range(3)] == [0, 1, 3]  # last freed first: 1, 3, 0
    assert towers.new_ref() == 5
    towers.forget()
    assert towers.new_ref() == 0
