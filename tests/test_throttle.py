from proxy.throttle import FailureThrottle


def test_delay_grows_per_account_and_per_source_and_is_capped():
    t = FailureThrottle(base=0.5, cap=4)
    assert t.delay("alice", "10.0.0.1") == 0
    delays = []
    for _ in range(6):
        t.failed("alice", "10.0.0.1")
        delays.append(t.delay("alice", "10.0.0.1"))
    assert delays == [0.5, 1, 2, 4, 4, 4]
    assert t.delay("alice", "10.0.0.2") == 4      # same account from elsewhere
    assert t.delay("bob", "10.0.0.1") == 4        # same source guessing another account
    assert t.delay("bob", "10.0.0.9") == 0
    t.succeeded("alice")
    assert t.delay("alice", "10.0.0.2") == 0
