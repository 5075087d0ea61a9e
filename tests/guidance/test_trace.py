import torch

from guidance import GuidanceTrace


def test_nfe_counts_evaluations_per_image():
    trace = GuidanceTrace(batch_size=2)
    both = {"cond": torch.tensor([True, True]), "uncond": torch.tensor([True, True])}
    one = {"cond": torch.tensor([True, True]), "uncond": torch.tensor([True, False])}
    trace.record(torch.tensor([7.5, 7.5]), both)
    trace.record(torch.tensor([7.5, 1.0]), one)
    assert trace.nfe == (4 + 3) / 2
    assert trace.scales_tensor().tolist() == [[7.5, 7.5], [7.5, 1.0]]
    assert trace.branches[1]["uncond"] == [True, False]
    assert trace.to_dict()["nfe"] == 3.5
