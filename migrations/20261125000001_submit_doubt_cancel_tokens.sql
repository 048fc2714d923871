-- Providers without idempotency keys (Dify, GPTBots), cancellation at the
-- provider, and token counts.

-- Set (to the time) when a submit is about to be sent, cleared when its
-- answer is recorded or when it certainly created nothing. While it is set a
-- submit may be at the provider without wfq knowing its run: for providers
-- that cannot replay a key, the worker looks for that run (or gives up with
-- SUBMIT_OUTCOME_UNKNOWN) instead of sending a second, separately billed run.
ALTER TABLE wfq.runs ADD COLUMN submit_in_doubt_since timestamptz;
COMMENT ON COLUMN wfq.runs.submit_in_doubt_since IS
    'a submit was sent (or was about to be) and its answer is not recorded yet';

-- `wfq cancel` on a running run of a provider that can stop runs (Dify):
-- the worker asks the provider to stop it and records `canceled` once the
-- provider reports the run stopped.
ALTER TABLE wfq.runs ADD COLUMN cancel_requested_at timestamptz;
COMMENT ON COLUMN wfq.runs.cancel_requested_at IS
    'wfq cancel asked for this running run to be stopped at the provider';

-- Dify `total_tokens`, GPTBots `totalTokens`.
ALTER TABLE wfq.runs ADD COLUMN total_tokens bigint;
COMMENT ON COLUMN wfq.runs.total_tokens IS 'tokens the provider reports the run used';

-- stuck_runs also names submits whose outcome has been unknown for over ten
-- minutes: a Dify run being looked for is touched every few seconds, so its
-- updated_at never looks old.
CREATE OR REPLACE VIEW wfq.stuck_runs AS
SELECT id, provider, workflow_id, state, attempts, polls, provider_run_id,
       lease_owner, lease_expires_at, due_at, submitted_at, updated_at,
       CASE
           WHEN lease_owner IS NOT NULL AND lease_expires_at < now() THEN 'lease expired'
           WHEN submit_in_doubt_since < now() - interval '10 minutes'
               THEN 'submit outcome unknown for over 10 minutes'
           WHEN state = 'submitting' THEN 'submit not confirmed for over 10 minutes'
           ELSE 'running for over an hour'
       END AS reason,
       submit_in_doubt_since
FROM wfq.runs
WHERE state IN ('queued', 'submitting', 'running')
  AND ((lease_owner IS NOT NULL AND lease_expires_at < now())
       OR submit_in_doubt_since < now() - interval '10 minutes'
       OR (state = 'submitting' AND updated_at < now() - interval '10 minutes')
       OR (state = 'running' AND submitted_at < now() - interval '1 hour'));
