"""Credentials never reach messages, reprs, attributes or logs; env-var configuration works."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest

from repscope.errors import NotFoundError, StorageError
from repscope.store import ActivationStore, ingest_array, redact
from repscope.store.urls import storage_errors
from tests.s3server import FAKE_KEY, FAKE_SECRET


@pytest.mark.parametrize(
    "text, expected",
    [
        ("s3://AKIA123:s3cr3t@bucket/x", "s3://***@bucket/x"),
        ("https://user:pw@host:9000/b?x=1", "https://***@host:9000/b?x=1"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc&v=2",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&v=2",
        ),
        ("gs://b/x?token=ya29.abc&alt=media", "gs://b/x?token=***&alt=media"),
        ("failed with key=AKIA999 secret=zzz", "failed with key=*** secret=***"),
        ("/data/stores/probe-set", "/data/stores/probe-set"),
        ("memory://a/b", "memory://a/b"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_redact_masks_storage_option_values():
    assert redact(f"denied for {FAKE_SECRET}", [FAKE_SECRET]) == "denied for ***"


def test_credentials_in_url_never_shown():
    st = ActivationStore(f"s3://{FAKE_KEY}:{FAKE_SECRET}@bucket/store")
    for text in (st.url, repr(st), str(st)):
        assert FAKE_SECRET not in text and FAKE_KEY not in text


def test_storage_errors_are_redacted_and_not_chained():
    opts = {"key": FAKE_KEY, "secret": FAKE_SECRET}
    with pytest.raises(StorageError) as info:
        with storage_errors("s3://b/x", opts):
            raise PermissionError(f"access denied for {FAKE_KEY} signed with {FAKE_SECRET}")
    assert FAKE_SECRET not in str(info.value) and FAKE_KEY not in str(info.value)
    assert "access denied for *** signed with ***" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_s3_store_keeps_secrets_out_of_everything(s3_server, caplog):
    caplog.set_level(logging.INFO)
    opts = s3_server.storage_options
    st = ActivationStore.create(s3_server.url(), opts)
    ingest_array(st, "m", "l", np.ones((4, 2)), row_ids=[1, 2, 3, 4])
    st.read("m", "l")
    texts = [st.url, repr(st), json.dumps(st._root().attrs.asdict()), caplog.text]
    texts.append(json.dumps(st._unit_arrays()[("m", "l")].attrs.asdict()))
    with pytest.raises(NotFoundError) as missing:
        st.read("m", "nope")
    texts.append(str(missing.value))
    for text in texts:
        assert FAKE_SECRET not in text and FAKE_KEY not in text
    # Pickling keeps the options (workers need them to connect) but printing never shows them.
    clone = pickle.loads(pickle.dumps(st))
    assert FAKE_SECRET not in repr(clone)
    np.testing.assert_array_equal(clone.read("m", "l"), st.read("m", "l"))


def test_s3_configured_from_standard_environment_variables(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # A fresh s3fs instance, so that it reads the variables set just now.
    url = s3_server.url()
    st = ActivationStore.create(url, {"skip_instance_cache": True})
    ingest_array(st, "m", "l", np.arange(6.0).reshape(3, 2))
    explicit = ActivationStore.open(url, s3_server.storage_options)
    np.testing.assert_array_equal(explicit.read("m", "l"), np.arange(6.0).reshape(3, 2))


def test_gcs_without_gcsfs_is_a_clear_input_error():
    pytest.importorskip("zarr")
    import importlib.util

    from repscope.errors import InputError

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(
        InputError,
        match=r"store URL gs://bucket/st needs the 'gcsfs' package: "
        r"pip install 'repscope\[gcs\]'",
    ):
        ActivationStore.open("gs://bucket/st")
