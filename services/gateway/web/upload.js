// Upload a photo (picker, drag & drop, phone camera), show the answer, send right/wrong feedback.
//
// Answers may come back in any order: only the answer to the newest photo chosen is shown, and a "Why?" or a
// feedback reply counts only while the answer it was asked for is still the one on screen.
import { classify, explain, sendFeedback } from './api.js';
import { showWhy } from './explain.js';
import { el, pct, ms, showError } from './format.js';

const $ = (id) => document.getElementById(id);

export function setupUpload(getLabels) {
  const input = $('photo-input');
  const zone = $('drop-zone');
  let chosen = 0;  // how many photos were chosen so far; an answer to any but the last one is dropped
  let shown = null;  // {result, file, previewUrl} of the answer on screen, null while none (or while classifying)

  function hideWhy() {
    $('why').hidden = true;
    $('why').replaceChildren();
  }

  async function handle(file) {
    if (!file) return;
    const ticket = ++chosen;
    shown = null;
    showError($('upload-error'), null);
    $('feedback-status').textContent = '';
    hideWhy();
    $('result-layout').hidden = true;  // the previous photo's answer, which is not this photo's
    $('upload-status').textContent = `Classifying ${file.name || 'the photo'}…`;
    $('upload-status').hidden = false;
    try {
      const result = await classify(file, { topK: 3, filename: file.name || 'photo' });
      if (ticket !== chosen) return;
      render(result, file);
    } catch (error) {
      if (ticket !== chosen) return;
      showError($('upload-error'), error);
    } finally {
      if (ticket === chosen) $('upload-status').hidden = true;
    }
  }

  function render(result, file) {
    const preview = $('upload-preview');
    if (preview.src.startsWith('blob:')) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    shown = { result, file, previewUrl: preview.src };
    $('why-button').disabled = false;
    const top = result.predictions[0];
    $('verdict').textContent = result.not_a_mushroom
      ? `Not a mushroom (mushroom score ${pct(result.mushroom_score)})`
      : `${top.display_name || top.label} (${pct(top.score)})`;
    $('verdict').className = result.not_a_mushroom ? 'verdict not-mushroom' : 'verdict';
    const list = $('predictions');
    list.replaceChildren(...result.predictions.map((p) => el('li', { 'data-label': p.label },
      el('span', { class: 'name', text: p.display_name || p.label }),
      el('span', { class: 'bar', role: 'img', 'aria-label': pct(p.score) },
        el('span', { class: 'fill', style: `width:${(100 * p.score).toFixed(1)}%` })),
      el('span', { class: 'score', text: pct(p.score) }))));
    $('result-meta').textContent =
      `Model ${result.model.name} version ${result.model.version} · ${ms(result.latency_ms)} ms · ` +
      (result.cached ? 'cached' : 'not cached');
    const select = $('feedback-true');
    // the answering version's labels from /v1/models; the answer's own if that listed none
    const known = getLabels(result.model.version);
    const labels = known.length ? known : result.predictions;
    select.replaceChildren(...labels.map((l) => el('option', { value: l.label, text: l.display_name || l.label })));
    if (top) select.value = top.label;
    $('result-layout').hidden = false;
  }

  async function feedback(trueLabel) {
    const answered = shown;
    if (!answered) return;
    try {
      await sendFeedback(answered.result, trueLabel);
      if (shown === answered) $('feedback-status').textContent = `Thanks — recorded "${trueLabel}".`;
    } catch (error) {
      if (shown === answered) $('feedback-status').textContent = `Feedback not recorded: ${error.message}`;
    }
  }

  input.addEventListener('change', () => handle(input.files[0]));
  zone.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); input.click(); }
  });
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('dragging'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('dragging'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('dragging');
    handle(e.dataTransfer.files[0]);
  });
  $('feedback-right').addEventListener('click', () => {
    const first = document.querySelector('#predictions li');
    if (first) feedback(first.dataset.label);
  });
  $('feedback-wrong').addEventListener('click', () => feedback($('feedback-true').value));
  $('why-button').addEventListener('click', async () => {
    const asked = shown;  // the explanation is drawn only while this answer is still the one on screen
    if (!asked) return;
    const button = $('why-button');
    button.disabled = true;
    try {
      const result = await explain(asked.file, { filename: asked.file.name || 'photo' });
      if (shown === asked) showWhy($('why'), asked.previewUrl, result.explanation);
    } catch (error) {
      if (shown === asked) showError($('upload-error'), error);
    } finally {
      if (shown === asked) button.disabled = false;
    }
  });
}
