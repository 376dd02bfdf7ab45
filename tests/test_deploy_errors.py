"""``fxscale.save`` / ``fxscale.load``: the loaded package takes its inputs by forward's names and
checks them on the host, and easy mistakes give clear errors (found by a new-user trial).

One package is compiled for the module (``pkg``, ~15-25 s on the CPU); the other tests fail
before any compile.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxscale
from fxscale import deploy_checks


class _Bertish(nn.Module):
    """Like BertModel.forward(input_ids, attention_mask=None, token_type_ids=None): the mask and
    the token types have the same shape and dtype, so swapping them passes every size check."""

    def __init__(self):
        super().__init__()
        self.e, self.t, self.lin = nn.Embedding(100, 32), nn.Embedding(2, 32), nn.Linear(32, 32)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.lin(self.e(input_ids) + self.t(token_type_ids)) * attention_mask[..., None]


def _batch(b: int = 2, seq: int = 12) -> dict:
    g = torch.Generator().manual_seed(b)
    ids = torch.randint(0, 100, (b, seq), generator=g)
    am = torch.ones_like(ids)
    am[-1, seq // 2:] = 0
    tt = torch.zeros_like(ids)
    tt[:, seq // 3:] = 1
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am}  # HF tokenizers' key order


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    torch.manual_seed(0)
    m, batch = _Bertish().eval(), _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = fxscale.transform(m, batch)
        path = fxscale.save(sm, batch, tmp_path_factory.mktemp("deploy") / "bertish.pt2",
                            inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"})
    return sm, fxscale.load(path), str(path)


_TAKES = r"takes \(input_ids, attention_mask, token_type_ids\), in this order"


@pytest.mark.slow
def test_package__takes_a_dict_example_by_forwards_names(pkg):
    """f(**batch) failed with torch's 'kwarg keyword mismatch ... expected []'."""
    sm, run, _ = pkg
    with torch.no_grad():
        for b in (2, 5):
            batch = _batch(b)
            want = sm(**batch)
            assert torch.equal(run(**batch), want)
            assert torch.equal(run(batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                   attention_mask=batch["attention_mask"]), want)
            assert torch.equal(run(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]), want)


@pytest.mark.slow
def test_package__records_forwards_names_ranks_and_dtypes(pkg):
    _, run, _ = pkg
    specs = deploy_checks.loads(run.get_metadata())
    assert [(s["name"], s["rank"], s["dtype"]) for s in specs] == [
        ("input_ids", 2, "int64"), ("attention_mask", 2, "int64"), ("token_type_ids", 2, "int64")]
    assert specs[0]["shape"] == [None, 12]  # the batch is dynamic


@pytest.mark.slow
def test_package__wrong_names_or_counts_list_the_inputs(pkg):
    _, run, _ = pkg
    b = _batch()
    ids, am, tt = b["input_ids"], b["attention_mask"], b["token_type_ids"]
    with pytest.raises(ValueError, match=r"unknown input 'mask'; the package " + _TAKES):
        run(ids, mask=am, token_type_ids=tt)
    with pytest.raises(ValueError, match=r"missing input 'token_type_ids'; the package " + _TAKES):
        run(ids, am)
    with pytest.raises(ValueError, match=r"4 inputs given by position, 3 expected; the package " + _TAKES):
        run(ids, am, tt, tt)
    with pytest.raises(ValueError, match=r"input 'input_ids' given both by position and by name"):
        run(ids, am, tt, input_ids=ids)
    with pytest.raises(TypeError, match=r"call run\(\*\*inputs\)"):
        run(b)


@pytest.mark.slow
def test_package__checks_rank_dtype_and_layout_before_the_call(pkg):
    """A stride-0 (expanded) input raised 'expected size 4==4, stride 0==256 ... incorrect fake
    (aka meta) kernel'; another rank 'unmatched dim value at 2, expected: 32, but got: 0'."""
    _, run, path = pkg
    b = _batch()
    ids, am, tt = b["input_ids"], b["attention_mask"], b["token_type_ids"]
    with pytest.raises(ValueError, match=rf"{path}: input 'attention_mask' has 1 dimension.*rank 2, shape \(\*, 12\)"):
        run(ids, am[0], tt)
    with pytest.raises(ValueError, match=r"input 'token_type_ids' has dtype torch.int32.*takes torch.int64"):
        run(ids, am, tt.int())
    wide = am[:1].expand(4, 12)
    with pytest.raises(ValueError, match=r"input 'attention_mask' is not contiguous.*strides \(0, 1\).*x.contiguous\(\)"):
        run(ids[:1].expand(4, 12).contiguous(), wide, tt[:1].expand(4, 12).contiguous())
    with pytest.raises(ValueError, match=r"input 'input_ids' is not contiguous"):
        run(torch.randint(0, 100, (12, 2)).t(), am, tt)
    # a size AOTInductor's own check catches: its flat index named too
    with pytest.raises(ValueError, match=r"'token_type_ids', input 2 \(by position\): .*dim value"):
        run(ids, am, tt[:, :6].contiguous())


def test_save__a_plain_module_says_save_takes_the_transformed_one(tmp_path):
    m = nn.Sequential(nn.Linear(64, 64)).eval()
    with pytest.raises(TypeError, match=r"take the module fxscale.transform returned, got a Sequential"):
        fxscale.save(m, (torch.randn(8, 64),), tmp_path / "m.pt2")


def test_load__a_missing_path_is_a_file_not_found_naming_it(tmp_path):
    path = tmp_path / "does_not_exist.pt2"
    with pytest.raises(FileNotFoundError, match="does_not_exist.pt2"):
        fxscale.load(path)


def test_save__a_wrong_size_example_gives_the_modules_own_error(tmp_path):
    """It raised a bare 'AssertionError: Guard failed'."""
    m, x = nn.Sequential(nn.Linear(64, 64)).eval(), torch.randn(8, 64)
    sm = fxscale.transform(m, (x,))
    bad = torch.randn(8, 32)
    with pytest.raises(ValueError) as by_sm:
        sm(bad)
    with pytest.raises(ValueError, match=r"^fxscale.save: the example is not an input") as by_save:
        fxscale.save(sm, (bad,), tmp_path / "m.pt2")
    assert str(by_sm.value) in str(by_save.value)
    assert not (tmp_path / "m.pt2").exists()


def test_bind_inputs__none_and_python_values_as_the_example_had_them():
    x = torch.zeros(2, 3)
    specs = deploy_checks.input_specs(["x", "mask", "n"], (x, None, 4))
    assert deploy_checks.bind_inputs(specs, (x,), {}, "p") == (x, None, 4)
    with pytest.raises(ValueError, match="'mask' was None in the example"):
        deploy_checks.bind_inputs(specs, (x, x), {}, "p")
    with pytest.raises(ValueError, match="'n' is 5, but the package has the example's 4 compiled in"):
        deploy_checks.bind_inputs(specs, (x,), {"n": 5}, "p")


def test_package__without_recorded_names_refuses_keywords():
    """A package saved before the names were recorded: by position, as before."""
    run = fxscale.deploy._Package(lambda *a: a, "old.pt2", None)
    assert run(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="records no input names"):
        run(x=1)
