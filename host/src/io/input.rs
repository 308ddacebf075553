//! Bounded reading of safetensors files (batch files, SPEC §8): the file type is checked before the file is
//! opened, the safetensors header is read and checked on its own (its length, duplicate
//! keys, every tensor's byte range against the file's length), and only then is each tensor
//! the batch needs read, straight into its `Vec<f32>`. A FIFO, a device, a directory, a
//! sparse or truncated file is refused before any data is read.

use super::fs::read_exact_at;
use super::json::key_path;
use crate::batch::BatchShape;
use crate::error::{Error, Result};
use safetensors::tensor::Metadata;
use safetensors::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use super::fs::open_regular;
pub use super::json::duplicate_key;

/// The largest safetensors header accepted, in bytes: the safetensors crate's own limit.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes of the little-endian header length that starts a safetensors file.
const LENGTH_BYTES: u64 = 8;

/// Where a safetensors file's bytes are.
#[derive(Debug)]
enum Data<'a> {
    /// The whole file in memory.
    Bytes(&'a [u8]),
    /// An open regular file, read where a tensor lies.
    File(File),
}

/// A safetensors file whose header has been read and checked: every tensor's byte range
/// lies inside the file, and the tensors fill the file exactly. Tensor data is read only by
/// [`SafetensorsInput::read_f32`].
#[derive(Debug)]
pub struct SafetensorsInput<'a> {
    path: PathBuf,
    header: Metadata,
    /// Where the data section starts: 8 bytes of length, then the header.
    data_start: u64,
    data: Data<'a>,
}

impl SafetensorsInput<'static> {
    /// Opens `path` (a regular file only, see [`open_regular`]) and reads and checks its
    /// header; no tensor data is read.
    ///
    /// # Errors
    /// [`Error::File`] for a file that is not regular, unreadable, or not a valid
    /// safetensors file (header length, JSON, duplicate keys, tensor byte ranges).
    pub fn open(path: &Path) -> Result<Self> {
        let (file, file_len) = open_regular(path)?;
        let file_error = |problem: String| Error::File {
            path: path.to_owned(),
            problem,
        };
        let read_at = |buffer: &mut [u8], offset: u64| {
            read_exact_at(&file, buffer, offset)
                .map_err(|e| file_error(format!("cannot read: {e}")))
        };
        let n = header_length(file_len).map_err(&file_error)?;
        let mut length = [0u8; LENGTH_BYTES as usize];
        read_at(&mut length, 0)?;
        let n = n(u64::from_le_bytes(length)).map_err(&file_error)?;
        let mut header = vec![0u8; n as usize];
        read_at(&mut header, LENGTH_BYTES)?;
        let header = parse_header(&header, n, file_len).map_err(&file_error)?;
        Ok(Self {
            path: path.to_owned(),
            header,
            data_start: LENGTH_BYTES + n,
            data: Data::File(file),
        })
    }
}

impl<'a> SafetensorsInput<'a> {
    /// Reads and checks the header of a safetensors file held in memory; `path` only
    /// names the file in errors.
    ///
    /// # Errors
    /// As [`SafetensorsInput::open`].
    pub fn from_bytes(bytes: &'a [u8], path: &Path) -> Result<Self> {
        let file_error = |problem: String| Error::File {
            path: path.to_owned(),
            problem,
        };
        let file_len = bytes.len() as u64;
        let n = header_length(file_len).map_err(&file_error)?;
        let length: [u8; 8] = bytes[..8].try_into().expect("length checked");
        let n = n(u64::from_le_bytes(length)).map_err(&file_error)?;
        let header = &bytes[LENGTH_BYTES as usize..(LENGTH_BYTES + n) as usize];
        let header = parse_header(header, n, file_len).map_err(&file_error)?;
        Ok(Self {
            path: path.to_owned(),
            header,
            data_start: LENGTH_BYTES + n,
            data: Data::Bytes(bytes),
        })
    }

    /// The header's `__metadata__` (string keys and values), if any.
    #[must_use]
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.header.metadata().as_ref()
    }

    /// Whether the file holds a tensor named `name`.
    #[must_use]
    pub fn has(&self, name: &str) -> bool {
        self.header.info(name).is_some()
    }

    /// The declared dtype and shape of tensor `name`, if present.
    #[must_use]
    pub fn declared(&self, name: &str) -> Option<(Dtype, &[usize])> {
        self.header
            .info(name)
            .map(|i| (i.dtype, i.shape.as_slice()))
    }

    /// The declared shape of tensor `name` if present, checked to be F32.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the tensor when it is not F32.
    pub fn declared_f32(&self, name: &'static str) -> Result<Option<&[usize]>> {
        match self.declared(name) {
            Some((Dtype::F32, dims)) => Ok(Some(dims)),
            Some((dtype, _)) => Err(Error::shape(name, format!("dtype {dtype:?}, expected F32"))),
            None => Ok(None),
        }
    }

    /// The bytes the header declares for those of `names` the file holds.
    #[must_use]
    pub fn declared_bytes(&self, names: &[&str]) -> u64 {
        names
            .iter()
            .filter_map(|name| self.header.info(name))
            .map(|info| (info.data_offsets.1 - info.data_offsets.0) as u64)
            .sum()
    }

    /// The batch shape the header declares (B, P, C from `student_conf`, M from `targets`),
    /// when both tensors are present with rank 3; the full shape checks come later.
    #[must_use]
    pub fn declared_shape(&self) -> Option<BatchShape> {
        match (self.declared("student_conf"), self.declared("targets")) {
            (Some((_, &[b, p, c])), Some((_, &[_, m, _]))) => Some(BatchShape {
                batch: b,
                priors: p,
                classes: c,
                objects: m,
            }),
            _ => None,
        }
    }

    /// Reads the f32 tensor `name`: its shape and values, read straight into the vector.
    ///
    /// # Errors
    /// [`Error::Shape`] naming the tensor when it is missing or not F32; [`Error::File`]
    /// when reading fails.
    pub fn read_f32(&self, name: &'static str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| Error::shape(name, format!("missing from {}", self.path.display())))?;
        self.declared_f32(name)?;
        // The header check made (end - start) = 4 × the shape's product, inside the file.
        let (start, end) = info.data_offsets;
        let mut values = vec![0.0f32; (end - start) / 4];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
        let offset = self.data_start + start as u64;
        match &self.data {
            Data::Bytes(all) => {
                let from = offset as usize;
                bytes.copy_from_slice(&all[from..from + bytes.len()]);
            }
            Data::File(file) => {
                read_exact_at(file, bytes, offset).map_err(|e| Error::File {
                    path: self.path.clone(),
                    problem: format!("cannot read tensor `{name}`: {e}"),
                })?;
            }
        }
        // safetensors stores little-endian values; a no-op on little-endian machines.
        for value in &mut values {
            *value = f32::from_bits(u32::from_le(value.to_bits()));
        }
        Ok((info.shape.clone(), values))
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Checks the file is long enough for the 8-byte header length, and returns the check of
/// the length itself: at most [`MAX_HEADER_BYTES`], and inside the file.
fn header_length(
    file_len: u64,
) -> std::result::Result<impl Fn(u64) -> std::result::Result<u64, String>, String> {
    if file_len < LENGTH_BYTES {
        return Err(format!(
            "not a valid safetensors file: {file_len} bytes, too short for the 8-byte header length"
        ));
    }
    Ok(move |n: u64| {
        if n > MAX_HEADER_BYTES {
            Err(format!(
                "not a valid safetensors file: header length {n} bytes exceeds the limit of {MAX_HEADER_BYTES}"
            ))
        } else if n == 0 || n > file_len - LENGTH_BYTES {
            Err(format!(
                "not a valid safetensors file: header length {n} bytes does not fit a file of {file_len} bytes"
            ))
        } else {
            Ok(n)
        }
    })
}

/// Parses and checks a header: UTF-8 JSON without duplicate keys, the safetensors crate's
/// checks (dtypes, shapes, contiguous byte ranges), and the data it declares filling the
/// rest of the file exactly.
fn parse_header(header: &[u8], n: u64, file_len: u64) -> std::result::Result<Metadata, String> {
    let invalid = |problem: String| format!("not a valid safetensors file: {problem}");
    let text = std::str::from_utf8(header).map_err(|e| invalid(format!("header: {e}")))?;
    match duplicate_key(text) {
        Ok(Some(path)) => {
            return Err(invalid(format!(
                "header key {} appears more than once",
                key_path(&path)
            )))
        }
        Ok(None) => {}
        Err(e) => return Err(invalid(format!("header: {e}"))),
    }
    let metadata: Metadata =
        serde_json::from_str(text).map_err(|e| invalid(format!("header: {e}")))?;
    let declared = metadata.data_len() as u64;
    let held = file_len - LENGTH_BYTES - n;
    if declared != held {
        return Err(invalid(format!(
            "the header declares {declared} bytes of tensor data, the file holds {held} after the header{}",
            if declared > held { " (truncated?)" } else { "" }
        )));
    }
    Ok(metadata)
}
