//! Freeze windows: times when deploys of an app, or to a region, are refused.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::logic::{now, Controller, Error, Result};
use crate::store::Tree;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FreezeWindow {
    pub id: String,
    pub from: i64,
    pub to: i64,
    pub reason: String,
    pub app: Option<String>,
    pub region: Option<String>,
    pub created_by: String,
}

impl Controller {
    pub(super) fn active_freeze(&self, app: &str, regions: &HashSet<String>) -> Result<Option<FreezeWindow>> {
        let t = now();
        Ok(self.inner.store.list::<FreezeWindow>(Tree::Freezes)?.into_iter().map(|(_, f)| f).find(|f| {
            f.from <= t
                && t < f.to
                && f.app.as_deref().is_none_or(|a| a == app)
                && f.region.as_ref().is_none_or(|r| regions.contains(r))
        }))
    }

    /// Freeze windows: add, list, remove.
    pub async fn freeze_add(&self, mut f: FreezeWindow) -> Result<FreezeWindow> {
        if f.to <= f.from {
            return Err(Error::InvalidArgument("a freeze must end after it starts".into()));
        }
        if f.reason.trim().is_empty() {
            return Err(Error::InvalidArgument("a freeze needs a --reason".into()));
        }
        f.id = format!("fz-{}", self.inner.store.generate_id()? + 1);
        let f2 = f.clone();
        self.blocking(move |c| Ok(c.inner.store.put(Tree::Freezes, &f2.id, &f2, true)?)).await?;
        Ok(f)
    }

    pub async fn freezes(&self) -> Result<Vec<FreezeWindow>> {
        self.blocking(|c| {
            Ok(c.inner.store.list::<FreezeWindow>(Tree::Freezes)?.into_iter().map(|(_, f)| f).collect())
        })
        .await
    }

    pub async fn freeze_rm(&self, id: String) -> Result<()> {
        let existed = self.blocking(move |c| Ok(c.inner.store.remove(Tree::Freezes, &id)?)).await?;
        if existed {
            Ok(())
        } else {
            Err(Error::InvalidArgument("no such freeze window".into()))
        }
    }
}
