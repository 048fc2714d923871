-- Files in, files kept (issue 16): input files uploaded to the provider
-- before the submit, and media outputs mirrored to `[storage]` after a run
-- succeeded. Upgrade-safe like 20261202000001: the new table and view take
-- no lock on wfq.runs; the two columns added to it are nullable (no
-- rewrite), and the CHECK is NOT VALID (no scan: every row is NULL).
SET LOCAL lock_timeout = '500ms';

-- One row per file of a run, whichever way it goes.
--   input:  an `{"$file": ...}` value (or `wfq enqueue --input k=@path`),
--           uploaded to the provider; `provider_file_id` is what went into
--           the sent inputs (chenyu asset_uri, Dify upload_file_id, or the
--           URL GPTBots was given).
--   output: a media output of a succeeded run, copied to `[storage]`.
-- The row is the durable step: a retry, a crash or a rescue finds what was
-- done already and never uploads (or stores) twice what is recorded here.
CREATE TABLE IF NOT EXISTS wfq.run_files (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id              bigint      NOT NULL REFERENCES wfq.runs (id) ON DELETE CASCADE,
    direction           text        NOT NULL,
    -- The inputs key, or the outputs key.
    key                 text        NOT NULL,
    -- Index within a list output (0 for a single value).
    position            integer     NOT NULL DEFAULT 0,
    -- Where the value sits in the run's outputs (JSON path), for mirrored_outputs.
    json_path           text[]      NOT NULL DEFAULT '{}',
    -- The provider profile (wfq.runs.provider).
    profile             text        NOT NULL,
    -- Where the file came from: the $file location, or the provider's URL.
    source              text,
    sha256              text,
    bytes               bigint,
    content_type        text,
    provider_file_id    text,
    -- Until when the provider keeps its copy (an upload is reused until then).
    provider_expires_at timestamptz,
    -- Where wfq keeps the file (a URL under `[storage] url`).
    stored_location     text,
    -- input: uploading | done | failed; output: pending | done | failed |
    -- expired (the link was gone before it could be copied) | skipped (not media).
    state               text        NOT NULL DEFAULT 'pending',
    attempts            integer     NOT NULL DEFAULT 0,
    -- The next attempt (outputs): a durable retry schedule.
    due_at              timestamptz NOT NULL DEFAULT now(),
    lease_owner         text,
    lease_expires_at    timestamptz,
    error_code          text,
    error               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    CONSTRAINT run_files_direction_known CHECK (direction IN ('input', 'output')),
    CONSTRAINT run_files_state_known CHECK (
        state IN ('pending', 'uploading', 'done', 'failed', 'expired', 'skipped')),
    CONSTRAINT run_files_one_per_value UNIQUE (run_id, direction, key, position)
);

COMMENT ON TABLE wfq.run_files IS
    'input files uploaded to the provider and media outputs mirrored to [storage], one row per file';

-- Output copies that are due, oldest first (the mirror service's claim).
CREATE INDEX IF NOT EXISTS run_files_due_idx ON wfq.run_files (due_at, id)
    WHERE direction = 'output' AND state = 'pending';
-- Uploads that can be reused: same bytes, same profile.
CREATE INDEX IF NOT EXISTS run_files_uploaded_idx ON wfq.run_files (profile, sha256, id)
    WHERE direction = 'input' AND state = 'done';
-- At most one upload of the same bytes per profile in flight: the others
-- wait for it and reuse its result.
CREATE UNIQUE INDEX IF NOT EXISTS run_files_one_upload_idx ON wfq.run_files (profile, sha256)
    WHERE direction = 'input' AND state = 'uploading';

ALTER TABLE wfq.runs
    -- NULL: not looked at (no [storage], or finished before it was configured);
    -- pending: copies in progress; done: every media output is stored;
    -- failed: at least one could not be stored (see wfq.media_problems);
    -- none: the run has no media outputs.
    ADD COLUMN IF NOT EXISTS media_state text,
    -- The outputs with each mirrored file's stored location in place of the
    -- provider's URL (NULL where a file could not be stored).
    ADD COLUMN IF NOT EXISTS mirrored_outputs jsonb;

ALTER TABLE wfq.runs DROP CONSTRAINT IF EXISTS runs_media_state_known;
ALTER TABLE wfq.runs ADD CONSTRAINT runs_media_state_known
    CHECK (media_state IN ('pending', 'done', 'failed', 'none')) NOT VALID;

COMMENT ON COLUMN wfq.runs.media_state IS
    'mirroring of media outputs to [storage]: NULL (not looked at), pending, done, failed, none';
COMMENT ON COLUMN wfq.runs.mirrored_outputs IS
    'outputs with stored locations in place of the provider''s URLs (NULL where a copy failed)';

-- Mirrors that keep failing, or gave up: what an operator looks at.
CREATE OR REPLACE VIEW wfq.media_problems AS
SELECT f.run_id, r.provider, r.workflow_id, f.key, f.position, f.state, f.attempts,
       f.error_code, f.error, f.due_at AS next_attempt_at, f.source, r.finished_at
FROM wfq.run_files f
JOIN wfq.runs r ON r.id = f.run_id
WHERE f.direction = 'output'
  AND (f.state IN ('failed', 'expired') OR (f.state = 'pending' AND f.attempts > 0));

-- The outputs with each mirrored file's stored location in place of the
-- provider's URL, and NULL for a file that could not be stored.
CREATE OR REPLACE FUNCTION wfq.mirrored_outputs(p_run_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    result jsonb;
    f record;
BEGIN
    SELECT outputs INTO result FROM wfq.runs WHERE id = p_run_id;
    IF result IS NULL THEN
        RETURN NULL;
    END IF;
    FOR f IN SELECT json_path, state, stored_location FROM wfq.run_files
             WHERE run_id = p_run_id AND direction = 'output' AND state <> 'skipped'
             ORDER BY key, position
    LOOP
        result := jsonb_set(result, f.json_path,
                            CASE WHEN f.state = 'done' THEN to_jsonb(f.stored_location) ELSE 'null'::jsonb END,
                            false);
    END LOOP;
    RETURN result;
END;
$$;
