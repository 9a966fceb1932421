"""The DDPM path is unchanged by the family platform: SD 1.5, SD 2 and SDXL give the losses recorded
before it (tests/data/ddpm_losses.json, written by tests/ddpm_reference.py from the older code)."""

import json

import pytest
from ddpm_reference import CASES, DATA, losses


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=[c[0] for c in CASES])
def test_ddpm_losses_are_the_recorded_ones(name, overrides, demo_dir):
    recorded = json.loads(DATA.read_text())[name]
    # Bit-identical on the machine that recorded them; the tolerance only absorbs other CPUs' kernels.
    assert losses(demo_dir, overrides) == pytest.approx(recorded, rel=1e-6, abs=0)
