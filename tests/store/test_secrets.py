"""Credentials never reach messages, reprs, attributes or logs; env-var configuration works."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest

from repscope.errors import InputError, NotFoundError, StorageError
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


def _metadata(store: ActivationStore) -> list[str]:
    """Every metadata document of a store (its zarr.json files), as text."""
    from zarr.core.sync import sync

    async def names() -> list[str]:
        return [k async for k in store.catalog.zstore.list() if k.endswith("zarr.json")]

    keys = store.catalog.keys
    return [keys.get(k).decode() for k in sync(names())]


def test_s3_store_keeps_secrets_out_of_everything(s3_server, caplog):
    caplog.set_level(logging.INFO)
    opts = s3_server.storage_options
    st = ActivationStore.create(s3_server.url(), opts)
    ingest_array(st, "m", "l", np.ones((4, 2)), row_ids=[1, 2, 3, 4])
    st.read("m", "l")
    texts = [st.url, repr(st), caplog.text, *_metadata(st)]
    with pytest.raises(NotFoundError) as missing:
        st.read("m", "nope")
    texts.append(str(missing.value))
    for text in texts:
        assert FAKE_SECRET not in text and FAKE_KEY not in text
    # Pickling keeps the options (workers need them to connect) but printing never shows them.
    clone = pickle.loads(pickle.dumps(st))
    assert FAKE_SECRET not in repr(clone)
    np.testing.assert_array_equal(clone.read("m", "l"), st.read("m", "l"))


URL_USER, URL_SECRET = "planteduser", "planted-url-secret-77"


def test_credentials_in_an_s3_url_are_refused_without_echo():
    url = f"s3://{URL_USER}:{URL_SECRET}@bucket/acts.zarr"
    for fn in (ActivationStore.open, ActivationStore.create):
        with pytest.raises(InputError, match=r"credentials in the URL are not supported") as info:
            fn(url)
        assert URL_SECRET not in str(info.value) and URL_USER not in str(info.value)
        assert "s3://***@bucket/acts.zarr" in str(info.value)


def test_url_user_and_password_are_masked_wherever_the_backend_repeats_them():
    # What s3fs says when it takes "user:password@bucket" for a bucket name, and worse.
    url = f"s3://{URL_USER}:{URL_SECRET}@bucket/x"
    encoded = "pl%40nted-url-secret"
    with pytest.raises(StorageError) as info:
        with storage_errors(url):
            raise OSError(
                f'Invalid bucket name "{URL_USER}:{URL_SECRET}@bucket": must match regex\n'
                f"(user {URL_USER}, password {URL_SECRET})"
            )
    text = str(info.value)
    assert URL_SECRET not in text and URL_USER not in text
    assert "\n" not in text  # one line
    assert text.startswith("storage failure at s3://***@bucket/x: OSError: Invalid bucket name")
    # Percent-encoded passwords are masked as written and decoded.
    assert redact(f"s3://u:{encoded}@b/x failed for pl@nted-url-secret") == (
        "s3://***@b/x failed for ***"
    )


def test_every_store_error_path_keeps_planted_secrets_out(s3_server, tmp_path, capsys):
    """Open, create, read, write, damaged data, gone versions, bad names, the CLI."""
    from repscope.errors import IntegrityError, UnitChangedError
    from repscope.jobs.cli import main
    from tests.raycluster import free_port

    opts = s3_server.storage_options
    planted = [FAKE_KEY, FAKE_SECRET]
    messages: list[str] = []

    def expect(error, fn, *args, **kw):
        with pytest.raises(error) as info:
            fn(*args, **kw)
        messages.append(str(info.value))

    st = ActivationStore.create(s3_server.url(), opts)
    ingest_array(st, "m", "l", np.ones((30, 2)), row_ids=list(range(30)), chunk_bytes=40,
                 shard_bytes=80)
    pinned = st.unit_info("m", "l").version
    expect(NotFoundError, ActivationStore.open, s3_server.url(), opts)
    expect(NotFoundError, st.read, "m", "nope")
    expect(NotFoundError, st.read, "nope", "l")
    expect(InputError, st.read, "m", "l", 0, 31)
    expect(InputError, ingest_array, st, "m", "l", np.ones((30, 2)))  # exists
    expect(InputError, ingest_array, st, "m", "k", np.ones((29, 2)))  # rows differ
    expect(InputError, ingest_array, st, "m", "k", np.ones((30, 2)), row_ids=range(1, 31))
    expect(InputError, ingest_array, st, "m" * 300, "k", np.ones((30, 2)))
    ingest_array(st, "m", "l", np.zeros((30, 2)), overwrite=True)
    st.catalog.prune(grace_s=0)
    expect(UnitChangedError, st.read, "m", "l", version=pinned)
    keys = st.catalog.keys
    shard = f"{st._open('m', 'l', None).entry.path}/c/0/0"
    keys.put(shard, keys.get(shard)[:-3])
    expect(IntegrityError, st.read, "m", "l")
    keys.put("units/m/l/zarr.json", b"{not json")
    expect(IntegrityError, ActivationStore.open(st.url, opts).units)
    keys.put("zarr.json", b"{not json")
    expect(IntegrityError, ActivationStore.open, st.url, opts)
    unreachable = {**opts, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}",
                                             "region_name": "us-east-1"},
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    expect(StorageError, ActivationStore.create, s3_server.url(), unreachable)
    expect(InputError, ActivationStore.open, f"s3://{FAKE_KEY}:{FAKE_SECRET}@bucket/x")

    # The same through the command line.
    np.save(tmp_path / "a.npy", np.ones((3, 2)))
    cli_opts = [f"--storage-option=key={FAKE_KEY}", f"--storage-option=secret={FAKE_SECRET}",
                f"--storage-option=client_kwargs.endpoint_url={s3_server.endpoint_url}"]
    for argv in (
        ["inspect", st.url, *cli_opts],
        ["ingest", st.url, "m", str(tmp_path / "a.npy"), "--layer", "x", *cli_opts],
        ["inspect", f"s3://{FAKE_KEY}:{FAKE_SECRET}@bucket/x"],
        ["inspect", s3_server.url(), *cli_opts],
    ):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code in (1, 2) and len(err.strip().splitlines()) == 1, (argv, err)
        messages.append(out + err)
    for text in messages:
        assert not any(secret in text for secret in planted), text
        assert "\n" not in text.strip(), text


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
