// Operator panel: admin token (sessionStorage), routing weights with sliders (versions and version labels),
// audit log, live per-version figures, and the rollout controller's step, timers, judged figures and decisions,
// with a retry for each version it rejected.
import { getRouting, putRouting, getAudit, getStatus, getRollout, rolloutCommand } from './api.js';
import { el, pct, ms, showError } from './format.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'mushroom-admin-token';
const REFRESH_MS = 5000;

// An entry of the routing table is a version number ("2") or a version label ("canary") that the model server
// resolves. A new label must follow TF Serving's rule (letters, digits and '_', not all digits).
export const LABEL_RULE = /^[A-Za-z0-9_]+$/;
export const isLabel = (entry) => !/^[0-9]+$/.test(String(entry));
export const validLabel = (text) => LABEL_RULE.test(text) && isLabel(text);

// The routing document maps entries to weights; accept {weights: {e: w}} or {weights: [{version, weight}]}.
// Weights are shown as shares of the table's total (an operator may have set 90/10 with the CLI). AVAILABLE versions
// not in the table get a slider at 0; with no table set yet, the effective split seeds them. Labels keep their names.
export function weightsOf(routing) {
  const seeded = Object.fromEntries((routing.available || []).map((v) => [String(v), 0]));
  const set = Object.keys(routing.weights || {}).length ? routing.weights : (routing.effective || {});
  const plain = plainWeights(set);
  const total = Object.values(plain).reduce((a, b) => a + b, 0);
  const shares = Object.fromEntries(Object.entries(plain).map(([e, w]) => [e, total > 1 ? w / total : w]));
  return { ...seeded, ...shares };
}

function plainWeights(w) {
  if (Array.isArray(w)) return Object.fromEntries(w.map((x) => [String(x.version), Number(x.weight)]));
  return Object.fromEntries(Object.entries(w).map(([v, x]) => [String(v), Number(x)]));
}

// "stable → v2" for a label (the version it resolves to now), "Version 2" for a version number.
export function entryText(entry, resolved) {
  if (!isLabel(entry)) return `Version ${entry}`;
  if (!resolved || !(entry in resolved)) return `${entry} → (resolved when applied)`;
  return resolved[entry] === null || resolved[entry] === undefined ? `${entry} → unknown` : `${entry} → v${resolved[entry]}`;
}

// The gateway reports feedback as {total, correct, ...}; older answers had a plain count.
const feedbackCount = (v) => v.feedback_count ?? (v.feedback && typeof v.feedback === 'object' ? v.feedback.total
  : v.feedback) ?? 0;

// Numbers first, then labels, as the gateway lists them.
export const entryOrder = (a, b) => (isLabel(a) - isLabel(b))
  || (isLabel(a) ? (a < b ? -1 : a > b ? 1 : 0) : Number(a) - Number(b));

const seconds = (x) => `${Math.round(Number(x) || 0)} s`;

// One sentence for the rollout's state: what is stable, what is being rolled out, at which step, paused or not.
export function rolloutSummary(body) {
  const state = body && body.state;
  if (!state) return 'Rollout controller: no stable version adopted yet.';
  const rejected = state.rejected && state.rejected.length ? ` Rejected versions: ${state.rejected.join(', ')}.` : '';
  if (!body.step) return `Stable: version ${state.stable}. No rollout running.${rejected}`;
  const s = body.step;
  return `Rolling out version ${state.candidate} over stable version ${state.stable}: step ${s.index + 1} of ${s.of}, `
    + `${s.name} (${s.weight}% of traffic${s.shadow ? ', mirrored as shadow' : ''})`
    + `${state.paused ? ' — PAUSED' : ''}.${rejected}`;
}

export function timersText(body) {
  const t = body && body.timers;
  const judgement = body && body.state && body.state.judgement;
  const lease = `Controller: ${body && body.leader ? body.leader : 'no controller holds the lease'}.`;
  if (!t) return lease;
  const last = judgement ? ` Last judgement: ${judgement.decision} — ${judgement.reason}.` : '';
  return `Step held ${seconds(t.held_seconds)} of ${seconds(t.hold_seconds)} (${seconds(t.remaining_seconds)} left); `
    + `${judgement ? judgement.step_requests : 0} of ${body.step.min_requests} requests; rollout running for `
    + `${seconds(t.rollout_seconds)}.${last} ${lease}`;
}

export function historyText(event) {
  const when = new Date(event.at * 1000).toLocaleTimeString();
  const version = event.version === null || event.version === undefined ? '' : ` v${event.version}`;
  const step = event.step ? ` at ${event.step}` : '';
  const rule = event.rule ? ` [rule ${event.rule}]` : '';
  return `${when} ${event.outcome}${version}${step} by ${event.who}${rule}: ${event.reason}`;
}

export function setupOperator() {
  let token = sessionStorage.getItem(TOKEN_KEY);
  let routing = null;
  let timer = null;

  async function unlock() {
    showError($('operator-error'), null);
    try {
      routing = await getRouting(token);
      renderWeights();
      $('operator-body').hidden = false;
      await refresh();
      clearInterval(timer);
      timer = setInterval(refresh, REFRESH_MS);
    } catch (error) {
      $('operator-body').hidden = true;
      showError($('operator-error'), error);
    }
  }

  function weightRow(entry, weight) {
    const id = `weight-${entry}`;
    const kind = isLabel(entry) ? 'label' : 'version';
    const output = el('output', { for: id, id: `${id}-value`, text: weight.toFixed(2) });
    const slider = el('input', { type: 'range', id, min: '0', max: '1', step: '0.05', value: String(weight),
                                 'data-entry': entry, 'data-kind': kind });
    if (kind === 'version') slider.dataset.version = entry;
    slider.addEventListener('input', () => { output.textContent = Number(slider.value).toFixed(2); });
    const label = el('label', { for: id, id: `${id}-label`, 'data-entry': entry, 'data-kind': kind,
                                text: entryText(entry, routing.resolved) });
    return el('div', { class: `weight ${kind}` }, label, slider, output);
  }

  function renderWeights() {
    const weights = weightsOf(routing);
    const entries = Object.keys(weights).sort(entryOrder);
    $('weights').replaceChildren(...entries.map((entry) => weightRow(entry, weights[entry])));
    renderShadow(routing);
  }

  // Where the table's labels point now, from the periodic status: the sliders keep what the operator moved.
  function updateResolved(fresh) {
    if (!fresh || !fresh.resolved) return;
    routing = { ...routing, resolved: { ...(routing.resolved || {}), ...fresh.resolved },
                shadow: 'shadow' in fresh ? fresh.shadow : routing.shadow };
    for (const label of $('weights').querySelectorAll('label[data-kind=label]')) {
      if (label.dataset.entry in fresh.resolved) label.textContent = entryText(label.dataset.entry, routing.resolved);
    }
    renderShadow(routing);
  }

  function renderShadow(r) {
    const shadow = r.shadow;
    $('shadow-info').textContent = shadow === null || shadow === undefined ? 'Shadow: none.'
      : `Shadow: ${isLabel(String(shadow)) ? entryText(String(shadow), r.resolved) : `version ${shadow}`} (kept as is when applying).`;
  }

  function addLabel(event) {
    event.preventDefault();
    const input = $('new-label');
    const label = input.value.trim();
    const error = !label ? 'Type a version label of the model server (e.g. canary).'
      : /^[0-9]+$/.test(label) ? `${label} is a version number, not a label: versions have their own slider.`
      : !validLabel(label) ? `"${label}" is not a valid version label: letters, digits and _ only ([a-zA-Z0-9_]+, TF Serving's rule), not all digits.`
      : document.getElementById(`weight-${label}`) ? `${label} is already in the table.` : null;
    showError($('new-label-error'), error ? { message: error } : null);
    if (error) return;
    $('weights').append(weightRow(label, 0));
    input.value = '';
    document.getElementById(`weight-${label}`).focus();
  }

  async function apply(event) {
    event.preventDefault();
    const weights = {};
    for (const slider of $('weights').querySelectorAll('input[type=range]')) {
      weights[slider.dataset.entry] = Number(slider.value);  // labels go back as labels, never as their version
    }
    $('routing-status').textContent = 'Applying…';
    showError($('operator-error'), null);
    try {
      routing = { ...routing, ...(await putRouting(token, { weights, shadow: routing.shadow ?? null })) };
      renderWeights();
      $('routing-status').textContent = 'Applied.';
      await refresh();
    } catch (error) {
      $('routing-status').textContent = '';
      showError($('operator-error'), error);
    }
  }

  async function refreshRollout() {
    let body;
    try {
      body = await getRollout(token);
    } catch (error) {
      const missing = error.code === 'rollout_not_configured';
      $('rollout-summary').textContent = missing ? 'No rollout controller is configured for this gateway.' : '';
      $('rollout-controls').hidden = missing;
      renderRejected([]);
      showError($('rollout-error'), missing ? null : error);
      return;
    }
    showError($('rollout-error'), null);
    $('rollout-controls').hidden = false;
    $('rollout-summary').textContent = rolloutSummary(body);
    $('rollout-timers').textContent = timersText(body);
    const state = body.state || {};
    const rolling = state.candidate !== null && state.candidate !== undefined;
    for (const button of $('rollout-controls').querySelectorAll('button')) {
      const action = button.dataset.action;
      button.disabled = !rolling || (action === 'pause' && state.paused) || (action === 'resume' && !state.paused);
    }
    const judgement = rolling ? state.judgement : null;
    const verdicts = judgement ? judgement.verdicts : [];
    $('rollout-verdicts').replaceChildren(...verdicts.map((v) => el('tr', { 'data-rule': v.rule },
      el('th', { scope: 'row', text: v.rule }), el('td', { class: `outcome-${v.outcome}`, text: v.outcome }),
      el('td', { text: v.reason }))));
    $('rollout-figures').textContent = judgement
      ? `(new version: ${judgement.new.requests} requests, ${judgement.new.shadow_requests} mirrored, `
        + `${judgement.new.feedback_total} feedback; stable: ${judgement.stable.requests} requests, `
        + `${judgement.stable.feedback_total} feedback, since the rollout started)` : '';
    renderRejected(state.rejected || []);
    $('rollout-history').replaceChildren(...(body.history || []).slice(0, 30).map((event) => el('li', {
      class: `outcome-${event.outcome}`, 'data-outcome': event.outcome, text: historyText(event) })));
  }

  // One "Retry version N" button per rejected version, rebuilt only when those versions change: a refresh keeps the
  // button under the keyboard focus.
  function renderRejected(versions) {
    const box = $('rollout-rejected');
    const shown = [...box.children].map((button) => button.dataset.version);
    if (shown.join(',') === versions.map(String).join(',')) return;
    box.replaceChildren(...versions.map((version) => el('button', {
      type: 'button', 'data-action': 'retry', 'data-version': String(version), text: `Retry version ${version}` })));
  }

  async function command(event) {
    const { action, version } = event.target.dataset;
    if (!action) return;
    showError($('rollout-error'), null);
    try {
      const { queued } = await rolloutCommand(token, action, version === undefined ? undefined : Number(version));
      const about = queued.version === undefined ? '' : ` of version ${queued.version}`;
      $('rollout-command-status').textContent = `Queued ${queued.action}${about} (by ${queued.who}): applied at the `
        + "controller's next tick.";
      await refreshRollout();
    } catch (error) {
      showError($('rollout-error'), error);
    }
  }

  async function refresh() {
    refreshRollout();
    try {
      const [status, audit] = await Promise.all([getStatus(token), getAudit(token)]);
      renderStatus(status);
      renderAudit(audit);
      $('status-updated').textContent = `(updated ${new Date().toLocaleTimeString()})`;
    } catch (error) {
      showError($('operator-error'), error);
    }
  }

  function renderStatus(status) {
    const versions = status.versions || {};
    const rows = Array.isArray(versions) ? versions.map((v) => [String(v.version), v]) : Object.entries(versions);
    const fresh = status.routing || {};
    updateResolved(fresh);
    const effective = fresh.effective || {};
    const total = Object.values(effective).reduce((a, b) => a + Number(b), 0);
    // Which table entries send traffic to a version now: "30.0% (canary)".
    const via = (version) => Object.entries(fresh.resolved || {})
      .filter(([entry, v]) => isLabel(entry) && String(v) === version).map(([entry]) => entry);
    const share = (version) => {
      if (fresh.fallback !== null && fresh.fallback !== undefined && String(fresh.fallback) === version) {
        return `${pct(1)} (fallback: no routed version is available)`;  // routing.py Router.fallback
      }
      const names = via(version);
      const part = total > 0 && version in effective ? pct(Number(effective[version]) / total) : pct(0);
      return names.length ? `${part} (${names.join(', ')})` : part;
    };
    $('status-rows').replaceChildren(...rows.map(([version, v]) => el('tr', { 'data-version': version },
      el('th', { scope: 'row', text: version }), el('td', { class: 'share', text: share(version) }),
      el('td', { text: String(v.requests ?? 0) }),
      el('td', { text: ms(v.p50_ms ?? v.latency_p50_ms) }), el('td', { text: ms(v.p95_ms ?? v.latency_p95_ms) }),
      el('td', { class: 'miss-p95', text: ms(v.miss_p95_ms) }),
      el('td', { text: pct(v.error_rate) }),
      el('td', { text: `${pct(v.feedback_accuracy)} (${feedbackCount(v)} answers)` }))));
    const sig = status.significance;
    $('significance').textContent = sig
      ? `Significance test: ${sig.test || ''} p = ${sig.p_value !== undefined && sig.p_value !== null ? Number(sig.p_value).toPrecision(3) : '–'}` +
        (sig.message ? ` — ${sig.message}` : '')
      : 'Significance test: needs two versions with feedback.';
  }

  function renderAudit(audit) {
    const entries = Array.isArray(audit) ? audit : (audit.entries || audit.audit || []);
    const brief = (x) => (x && typeof x === 'object' ? JSON.stringify(x.weights || x) : String(x ?? ''));
    $('audit').replaceChildren(...entries.slice(0, 20).map((e) => {  // the gateway lists the newest first
      const when = e.when || e.time || e.timestamp || e.at || '';
      const who = e.who || e.actor || e.user || '';
      const change = 'old' in e || 'new' in e ? `${brief(e.old)} → ${brief(e.new)}` : brief(e.weights || e.after || e.action);
      return el('li', { text: `${when} ${who} ${change}`.trim() });
    }));
  }

  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    token = $('admin-token').value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    unlock();
  });
  $('token-forget').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    clearInterval(timer);
    $('operator-body').hidden = true;
    $('admin-token').value = '';
  });
  $('routing-form').addEventListener('submit', apply);
  $('rollout-controls').addEventListener('click', command);
  $('rollout-rejected').addEventListener('click', command);
  $('add-label').addEventListener('click', addLabel);
  // Enter in the label field adds the label; it must not submit (apply) the weights form.
  $('new-label').addEventListener('keydown', (event) => { if (event.key === 'Enter') addLabel(event); });
  if (token) { $('admin-token').value = token; unlock(); }
}
