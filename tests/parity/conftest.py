"""Session fixtures: tiny transformers checkpoints saved to disk."""

import pytest
from tiny import hf_model


@pytest.fixture(scope="session")
def hf_untied():
    return hf_model(tie=False)


@pytest.fixture(scope="session")
def hf_tied():
    return hf_model(tie=True, seed=1)


@pytest.fixture(scope="session")
def saved_untied(hf_untied, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_untied")
    hf_untied.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def saved_tied(hf_tied, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tied")
    hf_tied.save_pretrained(path)
    return path
