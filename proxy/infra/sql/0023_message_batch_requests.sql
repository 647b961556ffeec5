-- An Anthropic message batch's requests' `custom_id`s, a row each (by its line in the batch's
-- input file): its results are read a page of lines at a time, joined to their answers
-- (`batch_lines`), instead of reading and parsing the whole input at each read. The batches
-- made before are filled in from their input files.
CREATE TABLE IF NOT EXISTS message_batch_requests (
    batch_id text NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    line integer NOT NULL,  -- 1-based, in the input file, as `batch_lines.line`
    custom_id text NOT NULL,
    PRIMARY KEY (batch_id, line)
);
INSERT INTO message_batch_requests (batch_id, line, custom_id)
SELECT b.id, t.n, t.line::json->>'custom_id'
FROM batches b JOIN files f ON f.id = b.input_file_id,
    LATERAL regexp_split_to_table(convert_from(f.content, 'UTF8'), E'\n') WITH ORDINALITY AS t(line, n)
WHERE b.endpoint = '/v1/messages' AND t.line ~ '\S'
ON CONFLICT DO NOTHING;
