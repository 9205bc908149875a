//! A deterministic mixed workload used by the end-to-end tests.

#![allow(dead_code)]

use tokio_postgres::Client;

/// DDL run on the source and on every replay target.
pub const DDL: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(14,2));
CREATE TABLE orders (id integer PRIMARY KEY, account_id bigint, note text, big text);
CREATE TABLE kinds (
    id integer PRIMARY KEY,
    c_int2 smallint, c_int8 bigint, c_num numeric(20,6), c_real real, c_double double precision,
    c_text text, c_varchar varchar(40), c_char char(5), c_bool boolean, c_bytea bytea,
    c_json json, c_jsonb jsonb, c_uuid uuid, c_date date, c_time time, c_ts timestamp,
    c_tstz timestamptz, c_interval interval, c_int_arr integer[], c_text_arr text[], c_inet inet,
    c_mood mood, c_empty text, c_timetz timetz, c_bits bit varying(16)
);
CREATE TABLE nopk (a integer, b text);
ALTER TABLE nopk REPLICA IDENTITY FULL;
CREATE TABLE scratch (id integer PRIMARY KEY, v text);
"#;

pub const TABLES: &[&str] = &["accounts", "orders", "kinds", "nopk", "scratch"];

pub async fn setup(c: &Client, publication: &str) {
    c.batch_execute(DDL).await.unwrap();
    c.batch_execute(&format!("CREATE PUBLICATION {publication} FOR ALL TABLES"))
        .await
        .unwrap();
}

pub async fn setup_target(c: &Client) {
    c.batch_execute(DDL).await.unwrap();
}

/// Values that stress the CSV dialect and the text output of many types.
const KINDS_ROWS: &str = r#"
INSERT INTO kinds VALUES
 (1, 1, 9223372036854775807, 12345678901234.123456, 1.5, 3.141592653589793, 'plain', 'v', 'ab', true,
  '\x00ff10', '{"a": "q\"uote"}', '{"k": [1, 2, {"n": null}]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '2024-02-29', '23:59:59.999999', '2024-01-01 00:00:00.000001', '2024-06-01 12:00:00+02',
  '1 year 2 mons 3 days 04:05:06.789', '{1,NULL,3}', '{"a,b","c\"d",NULL,"\\N"}', '192.168.0.1/24',
  'happy', '', '12:00:00+05:30', B'1011'),
 (2, -32768, NULL, 'NaN', 'Infinity', '-Infinity', E'line1\nline2\r\nline3', 'comma, "quoted"', NULL, false,
  '\x', '[]', 'null', NULL, 'infinity', NULL, '-infinity', NULL, '-00:00:01', '{}', '{}', '::1',
  'sad', '\N', NULL, B''),
 (3, 0, 0, 0, -0.0, 1e-300, 'ünïcødé 🦀 ✓', '\N', '"', NULL, NULL, '"s"', '{"emoji": "🦀", "esc": "\\u0000-free"}',
  '00000000-0000-0000-0000-000000000000', '0001-01-01', '00:00:00', '1999-12-31 23:59:59', '1970-01-01 00:00:00+00',
  '0', '{{1,2},{3,4}}', '{""}', '10.0.0.0/8', 'ok', E'tab\there', '00:00:00+00', NULL);
"#;

/// Phase 1: inserts, updates (including primary-key changes and unchanged TOAST), deletes,
/// multi-table transactions, a REPLICA IDENTITY FULL table, a truncate.
pub async fn phase1(c: &Client) {
    c.batch_execute(
        "INSERT INTO accounts SELECT g, 'owner ' || g, g * 1.25 FROM generate_series(1, 200) g;
         INSERT INTO orders SELECT g, (g % 200) + 1, 'note ' || g,
            CASE WHEN g % 10 = 0 THEN (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 300) i) END
            FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    c.batch_execute(KINDS_ROWS).await.unwrap();
    c.batch_execute(
        "BEGIN;
         UPDATE accounts SET id = id + 10000 WHERE id % 17 = 0;
         UPDATE orders SET note = note || ' (edited)' WHERE id % 10 = 0;
         DELETE FROM orders WHERE id % 7 = 0;
         INSERT INTO scratch SELECT g, 'tmp' FROM generate_series(1, 50) g;
         COMMIT;
         INSERT INTO nopk VALUES (1, 'x'), (1, 'x'), (2, NULL), (3, 'three');
         UPDATE nopk SET b = 'y' WHERE a = 2;
         DELETE FROM nopk WHERE a = 3;
         UPDATE kinds SET c_text = c_text || E'\n\"more\"', c_int_arr = c_int_arr || 9 WHERE id = 1;",
    )
    .await
    .unwrap();
}

/// Phase 2: more of everything, including a truncate and many small transactions.
pub async fn phase2(c: &Client) {
    c.batch_execute(
        "TRUNCATE scratch;
         INSERT INTO scratch VALUES (1, 'after truncate');
         DELETE FROM kinds WHERE id = 2;
         UPDATE accounts SET balance = balance * 2 WHERE id < 50;",
    )
    .await
    .unwrap();
    for i in 0..40 {
        c.batch_execute(&format!(
            "BEGIN;
             INSERT INTO accounts VALUES ({id}, 'late {i}', {i});
             INSERT INTO orders VALUES ({oid}, {id}, 'late order', NULL);
             UPDATE orders SET account_id = {id} WHERE id = {upd};
             COMMIT;",
            id = 20000 + i,
            oid = 1000 + i,
            upd = 1 + i * 3
        ))
        .await
        .unwrap();
    }
    c.batch_execute(
        "UPDATE nopk SET b = 'z' WHERE b = 'x' AND ctid = (SELECT min(ctid) FROM nopk WHERE b = 'x');
         DELETE FROM accounts WHERE id BETWEEN 100 AND 120;",
    )
    .await
    .unwrap();
}
