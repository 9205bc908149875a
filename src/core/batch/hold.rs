//! The hold file: rows of a table parked between a reload marker and its cut.
//!
//! Records are appended to the factory's scratch space (in production an anonymous file in the
//! spool directory, so memory stays bounded however long the cut takes) and read back once, in
//! order, when the cut is known. Record layout (big-endian):
//! `commit_lsn u64 | seq u32 | commit_ts i64 | xid u32 | op u8 | schema u16 | len u32 | csv row`.
//! `schema` indexes the schemas seen while holding (a Relation message may change the columns).

use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use super::{Op, Position};
use crate::core::ack::BatchId;
use crate::lsn::Lsn;
use crate::table::TableSchema;

pub(super) struct Hold<H: Write> {
    pub id: BatchId,
    pub floor: Lsn,
    file: BufWriter<H>,
    schemas: Vec<Arc<TableSchema>>,
}

type Record = (Arc<TableSchema>, Position, i64, u32, Op, Vec<u8>);

fn op_code(op: Op) -> u8 {
    match op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Truncate => 3,
    }
}

fn op_from(b: u8) -> io::Result<Op> {
    Ok(match b {
        0 => Op::Insert,
        1 => Op::Update,
        2 => Op::Delete,
        3 => Op::Truncate,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "corrupt hold file",
            ))
        }
    })
}

impl<H: Read + Write + Seek> Hold<H> {
    pub fn new(id: BatchId, floor: Lsn, file: H) -> Self {
        Hold {
            id,
            floor,
            file: BufWriter::with_capacity(64 * 1024, file),
            schemas: Vec::new(),
        }
    }

    pub fn park(
        &mut self,
        schema: &Arc<TableSchema>,
        pos: Position,
        commit_ts: i64,
        xid: u32,
        op: Op,
        row: &[u8],
    ) -> io::Result<()> {
        let idx = match self
            .schemas
            .iter()
            .position(|s| Arc::ptr_eq(s, schema) || **s == **schema)
        {
            Some(i) => i,
            None => {
                self.schemas.push(schema.clone());
                self.schemas.len() - 1
            }
        };
        let w = &mut self.file;
        w.write_all(&pos.commit_lsn.0.to_be_bytes())?;
        w.write_all(&pos.seq.to_be_bytes())?;
        w.write_all(&commit_ts.to_be_bytes())?;
        w.write_all(&xid.to_be_bytes())?;
        w.write_all(&[op_code(op)])?;
        w.write_all(&(idx as u16).to_be_bytes())?;
        w.write_all(&(row.len() as u32).to_be_bytes())?;
        w.write_all(row)
    }

    /// Reads every parked record back, in the order parked.
    pub fn into_records(self) -> io::Result<impl Iterator<Item = io::Result<Record>>> {
        let schemas = self.schemas;
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        let mut r = BufReader::with_capacity(64 * 1024, file);
        Ok(std::iter::from_fn(move || {
            let mut head = [0u8; 8 + 4 + 8 + 4 + 1 + 2 + 4];
            match r.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return None,
                Err(e) => return Some(Err(e)),
            }
            let u64_at = |i: usize| u64::from_be_bytes(head[i..i + 8].try_into().expect("8 bytes"));
            let u32_at = |i: usize| u32::from_be_bytes(head[i..i + 4].try_into().expect("4 bytes"));
            let pos = Position::new(Lsn(u64_at(0)), u32_at(8));
            let commit_ts = u64_at(12) as i64;
            let xid = u32_at(20);
            let op = match op_from(head[24]) {
                Ok(op) => op,
                Err(e) => return Some(Err(e)),
            };
            let idx = u16::from_be_bytes([head[25], head[26]]) as usize;
            let len = u32_at(27) as usize;
            let mut row = vec![0u8; len];
            if let Err(e) = r.read_exact(&mut row) {
                return Some(Err(e));
            }
            let Some(schema) = schemas.get(idx).cloned() else {
                return Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "corrupt hold file",
                )));
            };
            Some(Ok((schema, pos, commit_ts, xid, op, row)))
        }))
    }
}
