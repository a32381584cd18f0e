//! Live agent sessions: opening (rate-limited per agent), heartbeats, ending, and the link
//! orders travel on.

use super::*;

impl Registry {
    /// Registers a live session for `agent_id` after its hello. A newer session replaces an
    /// older one for the same agent.
    pub async fn open_session(
        &self,
        agent_id: &str,
        agent_version: String,
        releases: Vec<ReportedRelease>,
        apps: Vec<crate::store::AppStatusRecord>,
        tx: SessionTx,
    ) -> Result<SessionHandle> {
        self.admit_session_open(agent_id)?;
        let (region, environment) = {
            let rec = self.check_agent(agent_id).await?;
            (rec.region, rec.environment)
        };
        let id = agent_id.to_owned();
        self.blocking(move |c| {
            c.core.store.update_agent(&id, true, |r| {
                r.last_seen = now();
                r.agent_version = agent_version.clone();
                r.releases = releases.clone();
                r.apps = apps.clone();
            })?;
            Ok(())
        })
        .await?;
        let session_id = self.inner.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let last_seen = Arc::new(AtomicI64::new(now()));
        let old = {
            let mut sessions = self.lock_sessions();
            // A session that replaces the agent's own older one keeps the agent online: orders
            // in flight stay in flight.
            let offline = sessions.get(agent_id).map(|s| s.offline.clone()).unwrap_or_default();
            let old = sessions.insert(
                agent_id.to_owned(),
                Session {
                    id: session_id,
                    environment: environment.clone(),
                    region: region.clone(),
                    cancel: cancel.clone(),
                    offline,
                    tx,
                    last_seen: last_seen.clone(),
                },
            );
            // A session that replaces the agent's own older one changes no count.
            if old.is_none() {
                self.core.metrics().agent_online(environment.as_str(), &region);
            }
            old
        };
        if let Some(old) = old {
            old.cancel.cancel();
        }
        let handle = SessionHandle { agent_id: agent_id.to_owned(), session_id, cancel, last_seen };
        // A revocation that landed between the check above and the insert found no session to
        // close: look again now that the session is visible to it.
        if let Err(e) = self.check_agent(agent_id).await {
            self.end_session(&handle).await;
            return Err(e);
        }
        tracing::info!(agent_id, session_id, "agent online");
        Ok(handle)
    }

    /// Refuses an agent that opens sessions faster than [`SESSION_OPENS_BURST`] back to back
    /// and one a second after that: each open writes its record and starts its loop, and a
    /// reconnect loop must not turn that into a flood (nor reset a session's heartbeat budget).
    pub(super) fn admit_session_open(&self, agent_id: &str) -> Result<()> {
        if take_token(&self.inner.session_opens, agent_id, SESSION_OPENS_BURST) {
            Ok(())
        } else {
            Err(Error::Busy(format!("agent {agent_id:?} reconnects too often: retry in a second")))
        }
    }

    pub(super) fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding this lock cannot leave the map inconsistent: every critical
        // section is a single insert or remove.
        self.inner.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat the session's [`heartbeats::Heartbeats`] judged: last-seen in memory
    /// always, the agent's record only for [`heartbeats::Verdict::Write`]. Not flushed:
    /// last-seen times are advisory, sled flushes them soon.
    pub async fn heartbeat(
        &self,
        handle: &SessionHandle,
        verdict: heartbeats::Verdict,
        releases: Vec<ReportedRelease>,
        apps: Vec<crate::store::AppStatusRecord>,
    ) -> Result<()> {
        handle.last_seen.store(now(), std::sync::atomic::Ordering::Relaxed);
        if verdict != heartbeats::Verdict::Write {
            return Ok(());
        }
        let id = handle.agent_id.clone();
        self.blocking(move |c| {
            c.core.store.update_agent(&id, false, |r| {
                r.last_seen = now();
                r.releases = releases.clone();
                r.apps = apps.clone();
            })?;
            Ok(())
        })
        .await
    }

    /// Ends a session, unless a newer one has replaced it.
    pub async fn end_session(&self, handle: &SessionHandle) {
        let removed = {
            let mut sessions = self.lock_sessions();
            let removed = match sessions.get(&handle.agent_id) {
                Some(s) if s.id == handle.session_id => sessions.remove(&handle.agent_id),
                _ => None,
            };
            if let Some(s) = &removed {
                self.core.metrics().agent_offline(s.environment.as_str(), &s.region);
                // Orders in flight to the agent will not be answered: they fail now.
                s.offline.cancel();
            }
            removed.is_some()
        };
        if removed {
            let id = handle.agent_id.clone();
            let seen = self
                .blocking(move |c| Ok(c.core.store.update_agent(&id, true, |r| r.last_seen = now())?))
                .await;
            if let Err(e) = seen {
                tracing::warn!(agent_id = %handle.agent_id, error = %e, "last-seen time not recorded");
            }
            // Tell the webhooks if it stays away.
            let this = self.clone();
            let id = handle.agent_id.clone();
            let after = self.core.settings.offline_after;
            if !self.core.settings.notify_urls.is_empty() {
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(after) => {
                            if !this.is_online(&id) {
                                this.core.notify("agent_offline", serde_json::json!({"agent": id, "offline_for_secs": after.as_secs()}));
                            }
                        }
                        () = this.core.shutdown.cancelled() => {}
                    }
                });
            }
            tracing::info!(agent_id = %handle.agent_id, session_id = handle.session_id, "agent offline");
        }
    }

    /// Closes every live session (the controller is stopping).
    pub(crate) fn close_all_sessions(&self) {
        for (_, s) in self.lock_sessions().drain() {
            self.core.metrics().agent_offline(s.environment.as_str(), &s.region);
            s.cancel.cancel();
            s.offline.cancel();
        }
    }

    /// The way to `agent_id`'s live session, if it has one.
    pub fn link(&self, agent_id: &str) -> Option<Link> {
        self.lock_sessions().get(agent_id).map(|s| Link { tx: s.tx.clone(), offline: s.offline.clone() })
    }

    pub fn is_online(&self, agent_id: &str) -> bool {
        self.lock_sessions().contains_key(agent_id)
    }

    /// Lists agents, optionally only one region's.
    pub async fn list_agents(&self, region: Option<String>) -> Result<Vec<AgentView>> {
        let records = self.blocking(|c| Ok(c.core.store.agents()?)).await?;
        let sessions = self.lock_sessions();
        Ok(records
            .into_iter()
            .filter(|r| region.as_deref().is_none_or(|want| r.region == want))
            .map(|mut record| match sessions.get(&record.id) {
                Some(s) => {
                    record.last_seen =
                        record.last_seen.max(s.last_seen.load(std::sync::atomic::Ordering::Relaxed));
                    AgentView { online: true, record }
                }
                None => AgentView { online: false, record },
            })
            .collect())
    }
}
