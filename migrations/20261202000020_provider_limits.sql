-- Provider limits: why a profile is paused (not only a refused key), and
-- where a run waits in the provider's own queue. Upgrade-safe like
-- 20261202000001: nullable columns only, a short lock_timeout.
SET LOCAL lock_timeout = '500ms';

-- key: the provider refused the API key (nothing is claimed); balance,
-- account, breaker: the account may not start runs now (runs in flight are
-- followed, none is submitted); manual: an operator paused the profile
-- (every worker reads it and stops submitting).
ALTER TABLE wfq.provider_pauses ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'key';
COMMENT ON COLUMN wfq.provider_pauses.kind IS
    'key | balance | account | breaker | manual: why the profile submits nothing';

ALTER TABLE wfq.runs
    ADD COLUMN IF NOT EXISTS queue_position integer,
    ADD COLUMN IF NOT EXISTS queue_wait_secs integer;
COMMENT ON COLUMN wfq.runs.queue_position IS 'place in the provider''s queue while it waits there (chenyu queue_info.position)';
COMMENT ON COLUMN wfq.runs.queue_wait_secs IS 'the provider''s estimate of the wait in its queue, in seconds (chenyu queue_info.estimated_wait_sec)';
