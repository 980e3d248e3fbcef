import pytest

from fbtest import live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    """A live `finback serve` on a free loopback port with an empty store of its own."""
    store = tmp_path_factory.mktemp("models")
    with live_server(store, {"FINBACK_KEEP_ALIVE": "5m", "FINBACK_API_KEY": None}) as s:
        yield s.url, store
