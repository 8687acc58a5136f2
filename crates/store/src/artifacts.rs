//! The `kernels` and `images` tables.

use banger_core::{ImageRecord, InitMode, KernelRecord};
use rusqlite::{params, OptionalExtension, Row};

use crate::{is_unique_violation, Pending, Store, StoreError};

const KERNEL_COLUMNS: &str = "name, version, release, source, dir, created_at";
const IMAGE_COLUMNS: &str = "name, source, init_mode, rootfs, work_seed, sha256, size_bytes, created_at";

fn kernel_from_row(row: &Row<'_>) -> rusqlite::Result<KernelRecord> {
    Ok(KernelRecord {
        name: row.get(0)?,
        version: row.get(1)?,
        release: row.get(2)?,
        source: row.get(3)?,
        dir: row.get(4)?,
        created_at: row.get(5)?,
    })
}

fn image_from_row(row: &Row<'_>) -> rusqlite::Result<Result<ImageRecord, StoreError>> {
    let name: String = row.get(0)?;
    let mode: String = row.get(2)?;
    let size: i64 = row.get(6)?;
    let Some(init_mode) = InitMode::parse(&mode) else {
        return Ok(Err(StoreError::Corrupt { kind: "image", detail: format!("{name}: init mode {mode:?}") }));
    };
    Ok(Ok(ImageRecord {
        source: row.get(1)?,
        init_mode,
        rootfs: row.get(3)?,
        work_seed: row.get(4)?,
        sha256: row.get(5)?,
        size_bytes: u64::try_from(size).unwrap_or(0),
        created_at: row.get(7)?,
        name,
    }))
}

impl Store {
    /// Records a published kernel; a taken name gives [`StoreError::NameTaken`].
    pub fn insert_kernel(&self, k: &KernelRecord) -> Result<(), StoreError> {
        self.insert_kernel_as(k, None)
    }

    /// Records a kernel, complete (`None`) or with an unfinished step; a taken name (also by an
    /// unfinished kernel) gives [`StoreError::NameTaken`].
    pub fn insert_kernel_as(&self, k: &KernelRecord, pending: Option<Pending>) -> Result<(), StoreError> {
        let result = self.conn().execute(
            &format!("INSERT INTO kernels ({KERNEL_COLUMNS}, pending) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![k.name, k.version, k.release, k.source, k.dir, k.created_at, pending.map(Pending::as_str)],
        );
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::NameTaken { kind: "kernel", name: k.name.clone() }),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces kernel `k.name`'s row (being made) with `k`, complete.
    pub fn complete_kernel(&self, k: &KernelRecord) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE kernels SET version = ?2, release = ?3, source = ?4, dir = ?5, created_at = ?6, pending = NULL \
             WHERE name = ?1",
            params![k.name, k.version, k.release, k.source, k.dir, k.created_at],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound { kind: "kernel", reference: k.name.clone() });
        }
        Ok(())
    }

    /// A complete kernel by name, if recorded.
    pub fn get_kernel(&self, name: &str) -> Result<Option<KernelRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {KERNEL_COLUMNS} FROM kernels WHERE name = ?1 AND pending IS NULL"),
                [name],
                kernel_from_row,
            )
            .optional()?)
    }

    /// Every complete kernel, by name.
    pub fn list_kernels(&self) -> Result<Vec<KernelRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {KERNEL_COLUMNS} FROM kernels WHERE pending IS NULL ORDER BY name"))?;
        let rows = stmt.query_map([], kernel_from_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Forgets a kernel.
    pub fn delete_kernel(&self, name: &str) -> Result<(), StoreError> {
        match self.conn().execute("DELETE FROM kernels WHERE name = ?1", [name])? {
            0 => Err(StoreError::NotFound { kind: "kernel", reference: name.to_owned() }),
            _ => Ok(()),
        }
    }

    /// Records a published image; a taken name gives [`StoreError::NameTaken`].
    pub fn insert_image(&self, i: &ImageRecord) -> Result<(), StoreError> {
        self.insert_image_as(i, None)
    }

    /// Records an image, complete (`None`) or with an unfinished step; a taken name (also by an
    /// unfinished image) gives [`StoreError::NameTaken`].
    pub fn insert_image_as(&self, i: &ImageRecord, pending: Option<Pending>) -> Result<(), StoreError> {
        let result = self.conn().execute(
            &format!("INSERT INTO images ({IMAGE_COLUMNS}, pending) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            params![
                i.name,
                i.source,
                i.init_mode.as_str(),
                i.rootfs,
                i.work_seed,
                i.sha256,
                i64::try_from(i.size_bytes).unwrap_or(i64::MAX),
                i.created_at,
                pending.map(Pending::as_str),
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::NameTaken { kind: "image", name: i.name.clone() }),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces image `i.name`'s row (being made) with `i`, complete.
    pub fn complete_image(&self, i: &ImageRecord) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE images SET source = ?2, init_mode = ?3, rootfs = ?4, work_seed = ?5, sha256 = ?6, \
             size_bytes = ?7, created_at = ?8, pending = NULL WHERE name = ?1",
            params![
                i.name,
                i.source,
                i.init_mode.as_str(),
                i.rootfs,
                i.work_seed,
                i.sha256,
                i64::try_from(i.size_bytes).unwrap_or(i64::MAX),
                i.created_at
            ],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound { kind: "image", reference: i.name.clone() });
        }
        Ok(())
    }

    /// A complete image by name, if recorded.
    pub fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1 AND pending IS NULL"),
                [name],
                image_from_row,
            )
            .optional()?
            .transpose()
    }

    /// Every complete image, by name.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE pending IS NULL ORDER BY name"))?;
        let rows = stmt.query_map([], image_from_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().collect()
    }

    /// Records the work seed of image `name`.
    pub fn set_image_seed(&self, name: &str, seed: &str) -> Result<(), StoreError> {
        match self.conn().execute("UPDATE images SET work_seed = ?2 WHERE name = ?1", [name, seed])? {
            0 => Err(StoreError::NotFound { kind: "image", reference: name.to_owned() }),
            _ => Ok(()),
        }
    }

    /// Forgets an image.
    pub fn delete_image(&self, name: &str) -> Result<(), StoreError> {
        match self.conn().execute("DELETE FROM images WHERE name = ?1", [name])? {
            0 => Err(StoreError::NotFound { kind: "image", reference: name.to_owned() }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_and_images_round_trip() {
        let store = Store::open_in_memory().expect("open");
        let k = KernelRecord {
            name: "debian-6.1-cloud".into(),
            version: "6.1.192-2".into(),
            release: "6.1.0-56-cloud-amd64".into(),
            source: "apt:linux-image-6.1.0-56-cloud-amd64".into(),
            dir: "/k".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
        };
        store.insert_kernel(&k).expect("insert");
        assert!(matches!(store.insert_kernel(&k), Err(StoreError::NameTaken { kind: "kernel", .. })));
        assert_eq!(store.get_kernel("debian-6.1-cloud").expect("get"), Some(k.clone()));
        assert_eq!(store.list_kernels().expect("list"), vec![k]);
        store.delete_kernel("debian-6.1-cloud").expect("delete");
        assert_eq!(store.get_kernel("debian-6.1-cloud").expect("get"), None);

        let i = ImageRecord {
            name: "minimal".into(),
            source: "recipe:minimal".into(),
            init_mode: InitMode::Fast,
            rootfs: "/i/rootfs.ext4".into(),
            work_seed: None,
            sha256: Some("ab".into()),
            size_bytes: 42,
            created_at: "2026-01-01T00:00:00.000Z".into(),
        };
        store.insert_image(&i).expect("insert");
        assert!(matches!(store.insert_image(&i), Err(StoreError::NameTaken { kind: "image", .. })));
        assert_eq!(store.get_image("minimal").expect("get"), Some(i.clone()));
        assert_eq!(store.list_images().expect("list"), vec![i.clone()]);
        store.set_image_seed("minimal", "/i/work-seed.ext4").expect("seed");
        assert_eq!(
            store.get_image("minimal").expect("get").and_then(|i| i.work_seed).as_deref(),
            Some("/i/work-seed.ext4")
        );
        store.delete_image("minimal").expect("delete");
        assert!(store.delete_image("minimal").is_err());
    }
}
