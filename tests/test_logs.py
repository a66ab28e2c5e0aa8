"""The logging safety net masks secrets even if a message carried one."""

import io
import logging

from proxy.logs import redact, register_secret, setup_logging


def test_registered_secrets_and_credential_shapes_are_masked():
    register_secret("EwBwA8l6BAAUkj0zh5-registered-token")
    text = redact("token EwBwA8l6BAAUkj0zh5-registered-token used; user=a\x01auth=Bearer abc.def.ghi\x01\x01 "
                  '{"refresh_token": "0.AAAA-rt"} password=hunter22 Authorization: Bearer eyJ0eXAiOiJKV1QiLCJh')
    for secret in ("EwBwA8l6BAAUkj0zh5", "abc.def.ghi", "0.AAAA-rt", "hunter22", "eyJ0eXAiOiJKV1QiLCJh"):
        assert secret not in text
    assert text.count("[redacted]") >= 5


def test_handler_redacts_messages_args_and_tracebacks():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    setup_logging("DEBUG", stream=stream)
    register_secret("super-secret-access-token-value")
    log = logging.getLogger("proxy.test")
    log.debug("got %s", "super-secret-access-token-value")
    try:
        raise ValueError("leaked super-secret-access-token-value")
    except ValueError:
        log.exception("failure")
    root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    output = stream.getvalue()
    assert "super-secret-access-token-value" not in output
    assert "got [redacted]" in output and "ValueError: leaked [redacted]" in output
    assert logging.getLogger("msal").getEffectiveLevel() >= logging.WARNING


def test_bad_log_level_or_format_from_the_environment_is_a_usage_error(monkeypatch, capsys):
    import pytest
    from proxy.cli import main
    monkeypatch.setenv("PROXY_LOG_LEVEL", "chatty")
    with pytest.raises(SystemExit) as exit_:
        main(["status"])
    assert exit_.value.code == 2
    assert "invalid log level 'CHATTY'" in capsys.readouterr().err
    monkeypatch.setenv("PROXY_LOG_LEVEL", "debug")
    monkeypatch.setenv("PROXY_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as exit_:
        main(["status"])
    assert exit_.value.code == 2
    assert "invalid log format 'xml'" in capsys.readouterr().err
