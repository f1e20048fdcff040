// Operator panel: admin token (sessionStorage), routing weights with sliders, audit log, live per-version figures.
import { getRouting, putRouting, getAudit, getStatus } from './api.js';
import { el, pct, ms, showError } from './format.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'mushroom-admin-token';
const REFRESH_MS = 5000;

// The routing document maps versions to weights; accept {weights: {v: w}} or {weights: [{version, weight}]}.
// With no table set yet, the versions the gateway reports available (and its effective split) seed the sliders.
export function weightsOf(routing) {
  const seeded = Object.fromEntries((routing.available || []).map((v) => [String(v), 0]));
  const set = Object.keys(routing.weights || {}).length ? routing.weights : (routing.effective || {});
  return { ...seeded, ...plainWeights(set) };
}

function plainWeights(w) {
  if (Array.isArray(w)) return Object.fromEntries(w.map((x) => [String(x.version), Number(x.weight)]));
  return Object.fromEntries(Object.entries(w).map(([v, x]) => [String(v), Number(x)]));
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

  function renderWeights() {
    const weights = weightsOf(routing);
    $('weights').replaceChildren(...Object.entries(weights).map(([version, weight]) => {
      const id = `weight-${version}`;
      const output = el('output', { for: id, id: `${id}-value`, text: weight.toFixed(2) });
      const slider = el('input', { type: 'range', id, min: '0', max: '1', step: '0.05', value: String(weight),
                                   'data-version': version });
      slider.addEventListener('input', () => { output.textContent = Number(slider.value).toFixed(2); });
      return el('div', { class: 'weight' }, el('label', { for: id, text: `Version ${version}` }), slider, output);
    }));
  }

  async function apply(event) {
    event.preventDefault();
    const weights = {};
    for (const slider of $('weights').querySelectorAll('input[type=range]')) {
      weights[slider.dataset.version] = Number(slider.value);
    }
    $('routing-status').textContent = 'Applying…';
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

  async function refresh() {
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
    $('status-rows').replaceChildren(...rows.map(([version, v]) => el('tr', { 'data-version': version },
      el('th', { scope: 'row', text: version }), el('td', { text: String(v.requests ?? 0) }),
      el('td', { text: ms(v.p50_ms ?? v.latency_p50_ms) }), el('td', { text: ms(v.p95_ms ?? v.latency_p95_ms) }),
      el('td', { text: pct(v.error_rate) }),
      el('td', { text: `${pct(v.feedback_accuracy)} (${v.feedback_count ?? v.feedback ?? 0} answers)` }))));
    const sig = status.significance;
    $('significance').textContent = sig
      ? `Significance test: ${sig.test || ''} p = ${sig.p_value !== undefined && sig.p_value !== null ? Number(sig.p_value).toPrecision(3) : '–'}` +
        (sig.message ? ` — ${sig.message}` : '')
      : 'Significance test: needs two versions with feedback.';
  }

  function renderAudit(audit) {
    const entries = Array.isArray(audit) ? audit : (audit.entries || audit.audit || []);
    const brief = (x) => (x && typeof x === 'object' ? JSON.stringify(x.weights || x) : String(x ?? ''));
    $('audit').replaceChildren(...entries.slice(-20).reverse().map((e) => {
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
  if (token) { $('admin-token').value = token; unlock(); }
}
