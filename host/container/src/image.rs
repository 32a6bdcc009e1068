//! Content-addressed image layers: a layer tarball (plain or gzip) is named by the sha256 of the
//! file and unpacked once into `<dir>/layers/<sha256>`, read-only from then on (overlayfs lower
//! dir). Unpacking goes to a temporary directory renamed into place, so a layer directory is
//! either complete or absent.

use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ContainerError;

/// An unpacked layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub sha256: String,
    pub path: PathBuf,
}

/// Layers under one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    layers: PathBuf,
}

fn valid_sha(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ImageStore {
    /// Opens (creating if needed) the store under `dir`; removes unpacks left half-done.
    pub fn open(dir: &Path) -> Result<ImageStore, ContainerError> {
        let layers = dir.join("layers");
        fs::create_dir_all(&layers).map_err(|e| ContainerError::io("creating", &layers, e))?;
        let layers =
            fs::canonicalize(&layers).map_err(|e| ContainerError::io("resolving", &layers, e))?;
        if let Ok(rd) = fs::read_dir(&layers) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(ImageStore { layers })
    }

    /// Imports the layer tarball at `tar`, checking its sha256 when `expected_sha256` is given.
    /// A layer already present is not unpacked again (with an expected sha256, the file is
    /// then not even read).
    pub fn import_tar(
        &self,
        tar: &Path,
        expected_sha256: Option<&str>,
    ) -> Result<Layer, ContainerError> {
        self.import_tar_until(tar, expected_sha256, &|| false)
    }

    /// As [`ImageStore::import_tar`], giving up with [`ContainerError::Cancelled`] (and
    /// removing the partial unpack) once `cancelled` returns true. It is asked before each
    /// read of the tarball, so a stop during a long import takes effect within one read.
    pub fn import_tar_until(
        &self,
        tar: &Path,
        expected_sha256: Option<&str>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Layer, ContainerError> {
        if let Some(exp) = expected_sha256 {
            if !valid_sha(exp) {
                return Err(ContainerError::invalid(format!(
                    "expected sha256 {exp:?} is not 64 lowercase hex digits"
                )));
            }
        }
        // Only regular files: a device (/dev/zero) would be hashed forever, a FIFO would block
        // the open itself.
        let meta = fs::metadata(tar).map_err(|e| ContainerError::io("opening", tar, e))?;
        if !meta.is_file() {
            return Err(ContainerError::invalid(format!(
                "layer {} is not a regular file",
                tar.display()
            )));
        }
        // Content-addressed: a layer already here under the expected name is not read again.
        if let Some(layer) = expected_sha256.and_then(|exp| self.layer(exp)) {
            return Ok(layer);
        }
        let file = File::open(tar).map_err(|e| ContainerError::io("opening", tar, e))?;
        self.import_from(file, tar, expected_sha256, cancelled)
    }

    /// The import proper, from `src` (the tarball at `tar`, named in errors), in two reads.
    /// The first hashes the file: a file that does not hash to the expected sha256 is refused
    /// there, before anything is unpacked; without an expected sha256 it names the layer
    /// (and finds one already here). The second unpacks the tarball through the hasher, and
    /// the result is renamed into place only if that read hashes to the name too (the file
    /// may have changed since the first: stored as it was, whatever the second read found
    /// would have been stored under the first read's name).
    fn import_from<R: Read + Seek>(
        &self,
        src: R,
        tar: &Path,
        expected_sha256: Option<&str>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Layer, ContainerError> {
        let mut src = Until {
            inner: src,
            cancelled,
        };
        // A first pass hashes the file: with an expected sha256 a wrong file (a corrupt or
        // tampered download, a gzip bomb) is refused before anything is decompressed or
        // written; without one it finds a layer already here.
        let first = hash(&mut src).map_err(|e| cancel_or(&src, e, tar))?;
        let sha256 = match expected_sha256 {
            Some(exp) if exp != first => {
                return Err(ContainerError::Checksum {
                    expected: exp.to_string(),
                    actual: first,
                })
            }
            Some(exp) => exp.to_string(),
            None => {
                if let Some(layer) = self.layer(&first) {
                    return Ok(layer);
                }
                first
            }
        };
        src.inner
            .seek(SeekFrom::Start(0))
            .map_err(|e| ContainerError::io("reading", tar, e))?;
        let tmp = self.layers.join(format!(
            ".tmp-{sha256}-{}-{}",
            std::process::id(),
            fastish_nonce()
        ));
        let result = (|| {
            fs::create_dir(&tmp).map_err(|e| ContainerError::io("creating", &tmp, e))?;
            let mut read = Hashing {
                inner: &mut src,
                hasher: Sha256::new(),
            };
            let unpacked = unpack(BufReader::new(&mut read), &tmp);
            if cancelled() {
                return Err(ContainerError::Cancelled);
            }
            // The hash covers the whole file: what the unpack left unread (the archive's
            // padding, a gzip trailer) too. A wrong file is a checksum error even when it
            // does not unpack either.
            let drained = std::io::copy(&mut read, &mut std::io::sink());
            let actual = drained.is_ok().then(|| hex(read.hasher.finalize()));
            if let Err(e) = drained {
                if cancelled() {
                    return Err(ContainerError::Cancelled);
                }
                if unpacked.is_ok() {
                    return Err(ContainerError::io("reading", tar, e));
                }
            }
            if let Some(actual) = actual.filter(|a| *a != sha256) {
                return Err(ContainerError::Checksum {
                    expected: sha256.clone(),
                    actual,
                });
            }
            unpacked.map_err(|e| {
                let mut reason = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    reason.push_str(&format!(": {s}"));
                    src = s.source();
                }
                ContainerError::Image {
                    path: tar.to_path_buf(),
                    reason,
                }
            })?;
            // The layer is trusted by its name from the rename on, so its files reach the
            // disk first: after a power cut `layers/<sha>` is whole or absent (then imported
            // again), never present with empty or torn files.
            flush_fs(&tmp).map_err(|e| ContainerError::io("flushing", &tmp, e))?;
            let dest = self.layers.join(&sha256);
            match fs::rename(&tmp, &dest) {
                Ok(()) => {
                    File::open(&self.layers)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| ContainerError::io("flushing", &self.layers, e))?;
                    Ok(())
                }
                // Someone else unpacked the same layer meanwhile: theirs is as good.
                Err(_) if dest.is_dir() => {
                    let _ = fs::remove_dir_all(&tmp);
                    Ok(())
                }
                Err(e) => Err(ContainerError::io("renaming", &tmp, e)),
            }
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(Layer {
            path: self.layers.join(&sha256),
            sha256,
        })
    }

    /// The unpacked layer with this sha256, if present.
    pub fn layer(&self, sha256: &str) -> Option<Layer> {
        if !valid_sha(sha256) {
            return None;
        }
        let path = self.layers.join(sha256);
        path.is_dir().then(|| Layer {
            sha256: sha256.into(),
            path,
        })
    }
}

/// Flushes the filesystem holding `dir` (`syncfs(2)`): every file of a freshly unpacked
/// layer, its directories and metadata, in one call rather than one fsync per file.
fn flush_fs(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir)?;
    // SAFETY: `d` is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A reader that fails once `cancelled` says so.
struct Until<'a, R> {
    inner: R,
    cancelled: &'a dyn Fn() -> bool,
}

impl<R: Read> Read for Until<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.cancelled)() {
            return Err(std::io::Error::other("layer import cancelled"));
        }
        self.inner.read(buf)
    }
}

/// A reader that hashes everything read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn cancel_or<R>(file: &Until<'_, R>, e: std::io::Error, tar: &Path) -> ContainerError {
    if (file.cancelled)() {
        ContainerError::Cancelled
    } else {
        ContainerError::io("reading", tar, e)
    }
}

fn fastish_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn hash(r: &mut impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(h.finalize()))
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn unpack<R: Read>(mut r: BufReader<R>, dest: &Path) -> std::io::Result<()> {
    use std::io::BufRead;
    let gz = r.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read + '_> = if gz {
        Box::new(flate2::read::GzDecoder::new(r))
    } else {
        Box::new(r)
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    // `unpack` refuses entries that would land outside `dest` (.., absolute paths, symlinks).
    ar.unpack(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join(format!("l{}.tar", fastish_nonce()));
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.finish().unwrap();
        path
    }

    /// A temp dir removed on drop, so a failing test leaves nothing behind.
    fn tmpdir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("flynn-images-{name}-"))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn import_is_content_addressed_and_idempotent() {
        let tmp = tmpdir("idem");
        let d = tmp.path();
        let store = ImageStore::open(&d.join("store")).unwrap();
        let t = tarball(
            d,
            &[("bin/hello", b"#!/bin/sh\necho hi\n"), ("etc/x", b"x")],
        );
        let l = store.import_tar(&t, None).unwrap();
        assert_eq!(l.sha256.len(), 64);
        assert_eq!(fs::read(l.path.join("etc/x")).unwrap(), b"x");
        let again = store.import_tar(&t, Some(&l.sha256)).unwrap();
        assert_eq!(again, l);
        assert_eq!(store.layer(&l.sha256), Some(l.clone()));
        assert_eq!(store.layer(&"0".repeat(64)), None);
        assert_eq!(store.layer("../etc"), None);
        // No temporary dirs left.
        let names: Vec<_> = fs::read_dir(d.join("store/layers"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_cancelled_import_stops_mid_unpack_and_leaves_nothing() {
        let tmp = tmpdir("cancel");
        let d = tmp.path();
        let store = ImageStore::open(&d.join("store")).unwrap();
        // Several files, so the unpack reads many times after the hash's reads.
        let big = vec![5u8; 64 * 1024];
        let files: Vec<(String, &[u8])> =
            (0..8).map(|i| (format!("f{i}"), big.as_slice())).collect();
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        let t = tarball(d, &files);
        let sha = hash(&mut File::open(&t).unwrap()).unwrap();
        // Cancelled only once the unpack has begun: the temporary dir exists by then.
        let layers = d.join("store/layers");
        let asked = std::cell::Cell::new(0u32);
        let cancelled = || {
            asked.set(asked.get() + 1);
            fs::read_dir(&layers).unwrap().count() > 0
        };
        let err = store
            .import_tar_until(&t, Some(&sha), &cancelled)
            .unwrap_err();
        assert!(matches!(err, ContainerError::Cancelled), "{err}");
        assert!(asked.get() >= 2, "asked {} times", asked.get());
        assert_eq!(fs::read_dir(&layers).unwrap().count(), 0);
        assert_eq!(store.layer(&sha), None);
        // Cancelled before anything is read: the hash itself gives up.
        let err = store.import_tar_until(&t, None, &|| true).unwrap_err();
        assert!(matches!(err, ContainerError::Cancelled), "{err}");
        // Not cancelled: the same tarball imports.
        assert_eq!(store.import_tar(&t, Some(&sha)).unwrap().sha256, sha);
    }

    #[test]
    fn checksum_mismatch_and_bad_tar_leave_nothing() {
        let tmp = tmpdir("bad");
        let d = tmp.path();
        let store = ImageStore::open(&d.join("store")).unwrap();
        let t = tarball(d, &[("a", b"1")]);
        let err = store.import_tar(&t, Some(&"ab".repeat(32))).unwrap_err();
        assert!(matches!(err, ContainerError::Checksum { .. }), "{err}");
        assert!(matches!(
            store.import_tar(&t, Some("nothex")),
            Err(ContainerError::InvalidSpec { .. })
        ));
        let junk = d.join("junk.tar");
        fs::write(&junk, vec![7u8; 2000]).unwrap();
        assert!(store.import_tar(&junk, None).is_err());
        assert!(store.import_tar(&d.join("missing.tar"), None).is_err());
        // Not regular files: refused at once (a device would otherwise be read forever).
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = store.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s2.import_tar(Path::new("/dev/zero"), Some(&"ab".repeat(32))));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("/dev/zero refused promptly");
        assert!(
            matches!(r, Err(ContainerError::InvalidSpec { .. })),
            "{r:?}"
        );
        assert!(matches!(
            store.import_tar(d, None),
            Err(ContainerError::InvalidSpec { .. })
        ));
        assert_eq!(fs::read_dir(d.join("store/layers")).unwrap().count(), 0);
    }

    /// With an expected sha256, a file that does not hash to it is refused before anything is
    /// unpacked: no temporary dir is ever made under `layers` (the hook, asked before every
    /// read, would see it), nothing written, so a corrupt download or a gzip bomb does not
    /// fill the disk first.
    #[test]
    fn a_wrong_layer_is_refused_before_anything_is_unpacked() {
        let tmp = tmpdir("wrong");
        let d = tmp.path();
        let store = ImageStore::open(&d.join("store")).unwrap();
        let t = tarball(d, &[("etc/x", b"would be unpacked")]);
        let layers = d.join("store/layers");
        let (asked, seen) = (std::cell::Cell::new(0u32), std::cell::Cell::new(false));
        let watch = || {
            asked.set(asked.get() + 1);
            if fs::read_dir(&layers).unwrap().count() > 0 {
                seen.set(true);
            }
            false
        };
        let err = store
            .import_tar_until(&t, Some(&"ab".repeat(32)), &watch)
            .unwrap_err();
        assert!(matches!(err, ContainerError::Checksum { .. }), "{err}");
        assert!(asked.get() > 0);
        assert!(!seen.get(), "a temporary dir was made for a wrong layer");
        assert_eq!(fs::read_dir(&layers).unwrap().count(), 0);
        // The right sha256 imports it.
        let sha = hash(&mut File::open(&t).unwrap()).unwrap();
        assert!(store.import_tar_until(&t, Some(&sha), &watch).is_ok());
        assert!(seen.get());
    }

    /// A tarball that reads as one archive until it is rewound and as another after: a file
    /// rewritten between the import's hash and its unpack.
    struct Changing {
        first: std::io::Cursor<Vec<u8>>,
        then: std::io::Cursor<Vec<u8>>,
        rewound: bool,
    }

    impl Read for Changing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.rewound {
                false => self.first.read(buf),
                true => self.then.read(buf),
            }
        }
    }

    impl Seek for Changing {
        fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
            self.rewound = true;
            self.then.seek(to)
        }
    }

    /// The stored tree is the one whose bytes hash to its name: a tarball that changes after
    /// it was hashed is refused, not stored under the first content's sha256.
    #[test]
    fn a_tarball_that_changes_during_the_import_is_refused() {
        let tmp = tmpdir("changing");
        let d = tmp.path();
        let store = ImageStore::open(&d.join("store")).unwrap();
        let a = fs::read(tarball(d, &[("etc/x", b"genuine")])).unwrap();
        let b = fs::read(tarball(d, &[("etc/x", b"swapped")])).unwrap();
        let sha_a = hash(&mut a.as_slice()).unwrap();
        let changing = || Changing {
            first: std::io::Cursor::new(a.clone()),
            then: std::io::Cursor::new(b.clone()),
            rewound: false,
        };
        let tar = d.join("layer.tar");
        // Named by its first read, unpacked from its second.
        let err = store
            .import_from(changing(), &tar, None, &|| false)
            .unwrap_err();
        assert!(
            matches!(&err, ContainerError::Checksum { expected, .. } if *expected == sha_a),
            "{err}"
        );
        assert_eq!(store.layer(&sha_a), None);
        assert_eq!(fs::read_dir(d.join("store/layers")).unwrap().count(), 0);
        // Expected A, read as B from the start: refused as well, nothing stored.
        let mut only_b = changing();
        only_b.rewound = true;
        let err = store
            .import_from(only_b, &tar, Some(&sha_a), &|| false)
            .unwrap_err();
        assert!(matches!(err, ContainerError::Checksum { .. }), "{err}");
        assert_eq!(fs::read_dir(d.join("store/layers")).unwrap().count(), 0);
        // Expected A, read as A by the first (hashing) read and as B by the unpack's: the
        // unpack's read is hashed too, and refused.
        let err = store
            .import_from(changing(), &tar, Some(&sha_a), &|| false)
            .unwrap_err();
        assert!(
            matches!(&err, ContainerError::Checksum { expected, .. } if *expected == sha_a),
            "{err}"
        );
        assert_eq!(store.layer(&sha_a), None);
        assert_eq!(fs::read_dir(d.join("store/layers")).unwrap().count(), 0);
        // The genuine content imports, under its name, with its files.
        let l = store
            .import_from(std::io::Cursor::new(a.clone()), &tar, None, &|| false)
            .unwrap();
        assert_eq!(l.sha256, sha_a);
        assert_eq!(fs::read(l.path.join("etc/x")).unwrap(), b"genuine");
    }

    #[test]
    fn path_traversal_is_refused() {
        let tmp = tmpdir("trav");
        let d = tmp.path();
        let store = ImageStore::open(&d.join("store")).unwrap();
        // Write a raw header naming ../escape (the builder refuses to create one).
        let path = d.join("evil.tar");
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(b"x");
        bytes.resize(512 * 2, 0);
        bytes.extend_from_slice(&[0u8; 1024]);
        fs::write(&path, bytes).unwrap();
        let _ = store.import_tar(&path, None);
        assert!(!d.join("store/escape").exists());
        assert!(!d.join("store/layers/escape").exists());
    }

    #[test]
    fn symlink_and_hardlink_escapes_are_refused() {
        let tmp = tmpdir("links");
        let d = tmp.path();
        let store = ImageStore::open(&d.join("store")).unwrap();
        let outside = d.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), b"host file").unwrap();

        // A symlink to a host directory, then a file written through it.
        let path = d.join("symlink.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "l", &outside).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "l/pwned", &b"owned"[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        assert!(store.import_tar(&path, None).is_err());
        assert!(!outside.join("pwned").exists());

        // A hard link to a host file would put the host file inside the layer.
        let path = d.join("hardlink.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        h.set_mode(0o644);
        b.append_link(&mut h, "h", outside.join("secret")).unwrap();
        b.finish().unwrap();
        drop(b);
        assert!(store.import_tar(&path, None).is_err());
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host file");
        // Nothing half-unpacked is left.
        assert_eq!(fs::read_dir(d.join("store/layers")).unwrap().count(), 0);
    }
}
