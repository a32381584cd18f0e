//! Freeze windows: times when deploys of an app, or to a region, are refused.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::Rollouts;
use crate::logic::{Error, Result};
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

impl FreezeWindow {
    /// Whether this window freezes a deploy of `app` to `regions` at time `t`.
    pub fn freezes(&self, app: &str, regions: &HashSet<String>, t: i64) -> bool {
        self.from <= t
            && t < self.to
            && self.app.as_deref().is_none_or(|a| a == app)
            && self.region.as_ref().is_none_or(|r| regions.contains(r))
    }
}

impl Rollouts {
    /// The freeze window, if any, that freezes a deploy of `app` to `regions` at `t`. Blocking.
    pub(super) fn active_freeze(
        &self,
        app: &str,
        regions: &HashSet<String>,
        t: i64,
    ) -> Result<Option<FreezeWindow>> {
        let windows = self.core.store.list::<FreezeWindow>(Tree::Freezes)?;
        Ok(windows.into_iter().map(|(_, f)| f).find(|f| f.freezes(app, regions, t)))
    }

    /// Freeze windows: add, list, remove.
    pub async fn freeze_add(&self, mut f: FreezeWindow) -> Result<FreezeWindow> {
        if f.to <= f.from {
            return Err(Error::InvalidArgument("a freeze must end after it starts".into()));
        }
        if f.from < 0 || f.to > crate::time::LAST_RFC3339_SECOND {
            return Err(Error::InvalidArgument(
                "a freeze must lie between 1970 and the end of year 9999".into(),
            ));
        }
        if f.reason.trim().is_empty() {
            return Err(Error::MissingReason("freeze"));
        }
        self.blocking(move |c| {
            f.id = format!("fz-{}", c.core.store.generate_id()? + 1);
            c.core.store.put(Tree::Freezes, &f.id, &f, true)?;
            Ok(f)
        })
        .await
    }

    pub async fn freezes(&self) -> Result<Vec<FreezeWindow>> {
        self.blocking(|c| {
            Ok(c.core.store.list::<FreezeWindow>(Tree::Freezes)?.into_iter().map(|(_, f)| f).collect())
        })
        .await
    }

    pub async fn freeze_rm(&self, id: String) -> Result<()> {
        let existed = self.blocking(move |c| Ok(c.core.store.remove(Tree::Freezes, &id)?)).await?;
        if existed {
            Ok(())
        } else {
            Err(Error::InvalidArgument("no such freeze window".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_freezes_its_app_and_region_while_it_lasts() {
        let f = FreezeWindow {
            id: "fz-1".into(),
            from: 100,
            to: 200,
            reason: "peak".into(),
            app: Some("shop-api".into()),
            region: Some("eu-west".into()),
            created_by: "admin/a".into(),
        };
        let eu = HashSet::from(["eu-west".to_string(), "us-east".to_string()]);
        let us = HashSet::from(["us-east".to_string()]);
        assert!(f.freezes("shop-api", &eu, 100));
        assert!(f.freezes("shop-api", &eu, 199));
        assert!(!f.freezes("shop-api", &eu, 99), "not yet");
        assert!(!f.freezes("shop-api", &eu, 200), "over");
        assert!(!f.freezes("shop-api", &us, 150), "another region");
        assert!(!f.freezes("checkout", &eu, 150), "another app");
        let everything = FreezeWindow { app: None, region: None, ..f };
        assert!(everything.freezes("checkout", &us, 150));
    }
}
