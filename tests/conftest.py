"""Shared pytest setup. Test layers (see STYLE.md): server, slow, gpu, docker."""

MARKERS = {
    "server": "starts a real Triton server (the tritonserver from nvidia-pytriton)",
    "slow": "long-running (soak, full demo); left out of make test",
    "gpu": "needs an NVIDIA GPU",
    "docker": "needs a Docker engine",
}


def pytest_configure(config):
    # Harmless when pyproject's [tool.pytest.ini_options] declares them too.
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
