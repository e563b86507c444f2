import pytest

from harness import VARIANTS


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    """Every model variant of the shared harness (router x operators, and the spec's schedules)."""
    return request.param
