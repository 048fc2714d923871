-- No double bill, no stuck run. Written to upgrade a large, busy table
-- without stopping producers or workers: one ALTER that adds nullable or
-- constant-default columns (no table rewrite, a lock held for microseconds),
-- and a short lock_timeout so that a migration waiting behind a long
-- transaction gives up instead of queueing every producer behind it
-- (`wfq migrate` waits and tries again). While this ALTER waits for its
-- lock, every statement that arrives at the table queues behind it, so the
-- timeout is also the longest a producer or worker waits for the upgrade:
-- keep it well under what clients tolerate (tests/migrations.rs: a
-- producer with lock_timeout = 1s is never refused).
SET LOCAL lock_timeout = '500ms';

ALTER TABLE wfq.runs
    -- The token of the last transition written: a worker whose COMMIT answer
    -- was lost reads it back to learn whether its write landed.
    ADD COLUMN IF NOT EXISTS last_write uuid,
    -- How often a submit in doubt was sent again after its run could not be
    -- found (Dify); bounded by `max_resubmits`.
    ADD COLUMN IF NOT EXISTS resubmits integer NOT NULL DEFAULT 0,
    -- `wfq retry` resumed the run in place: its poll deadline starts here.
    ADD COLUMN IF NOT EXISTS resumed_at timestamptz,
    -- Since when the provider has answered with a status wfq does not know.
    ADD COLUMN IF NOT EXISTS unknown_status_since timestamptz,
    -- When the provider first said the run was over while its money was
    -- not final: settlement is waited for up to `poll.settle_wait`.
    ADD COLUMN IF NOT EXISTS provider_finished_at timestamptz,
    -- The provider reported no cost for a finished run: what the spend guard
    -- counts instead (the highest known cost of the workflow), never zero.
    ADD COLUMN IF NOT EXISTS cost_estimate numeric;

COMMENT ON COLUMN wfq.runs.last_write IS 'token of the last transition a worker wrote (read back after a lost COMMIT answer)';
COMMENT ON COLUMN wfq.runs.resubmits IS 'submits sent again after a lost answer whose run could not be found (Dify)';
COMMENT ON COLUMN wfq.runs.resumed_at IS 'wfq retry resumed this run in place; its poll deadline counts from here';
COMMENT ON COLUMN wfq.runs.unknown_status_since IS 'the provider has reported a status wfq does not know since then';
COMMENT ON COLUMN wfq.runs.provider_finished_at IS 'the provider first reported the run over (its money may still settle later)';
COMMENT ON COLUMN wfq.runs.cost_estimate IS 'stand-in for a cost the provider did not report (counted by the spend guard)';
