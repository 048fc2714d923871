-- The spend guard: runs held back by a profile's money limits say why, and
-- the committed amounts are summed through small indexes, not the history.

ALTER TABLE wfq.runs ADD COLUMN hold_reason text;
COMMENT ON COLUMN wfq.runs.hold_reason IS
    'why a queued run is not submitted yet (max_outstanding_frozen, daily_budget); cleared at submit';

-- Money frozen (or quoted, for submits in flight) and not settled yet.
CREATE INDEX runs_unsettled_idx ON wfq.runs (provider)
    WHERE settled_at IS NULL AND state <> 'queued';
-- Money committed per day of submission.
CREATE INDEX runs_provider_submitted_idx ON wfq.runs (provider, submitted_at)
    WHERE submitted_at IS NOT NULL;
