"""GRAPHOPT_DISABLE_KERNELS / GRAPHOPT_ENABLE_KERNELS name kernels of kernels/__init__.py; a name that is
not one is an error before anything registers (a typo would leave an A/B run silently unchanged)."""

import pytest

from graphopt.backends.inductor import kernels


@pytest.mark.parametrize("variable, value", [("GRAPHOPT_DISABLE_KERNELS", "linear,int8_gemvv"),
                                             ("GRAPHOPT_ENABLE_KERNELS", "all")])
def test_an_unknown_kernel_name_is_refused_with_the_accepted_names(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    before = kernels.registered()
    with pytest.raises(ValueError, match=rf"{variable}=.*unknown kernel name.*accepted: .*int8_expert_gemv"):
        kernels.register_all()
    assert kernels.registered() == before


def test_known_names_and_all_are_accepted(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DISABLE_KERNELS", " all , linear")
    monkeypatch.setenv("GRAPHOPT_ENABLE_KERNELS", "int8_expert_gemv")
    before = kernels.registered()
    assert kernels.register_all() == before          # "all" disabled: nothing new registers
