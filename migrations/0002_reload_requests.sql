-- cdc-egress registry, version 2: reload requests are keyed by the request id carried in the marker.
ALTER TABLE {{schema}}.reloads
    ADD COLUMN request    text,
    ADD COLUMN marker_lsn pg_lsn,
    ADD COLUMN attempts   integer NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX reloads_request_idx ON {{schema}}.reloads (request);
