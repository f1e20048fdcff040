// Upload a photo (picker, drag & drop, phone camera), show the answer, send right/wrong feedback.
import { classify, explain, sendFeedback } from './api.js';
import { showWhy } from './explain.js';
import { el, pct, ms, showError } from './format.js';

const $ = (id) => document.getElementById(id);

export function setupUpload(getLabels) {
  const input = $('photo-input');
  const zone = $('drop-zone');
  let lastAnswer = null;
  let lastFile = null;

  async function handle(file) {
    showError($('upload-error'), null);
    $('feedback-status').textContent = '';
    if (!file) return;
    $('verdict').textContent = 'Classifying…';
    try {
      const result = await classify(file, { topK: 3, filename: file.name || 'photo' });
      lastAnswer = result;
      lastFile = file;
      render(result, file);
    } catch (error) {
      $('result-layout').hidden = true;
      showError($('upload-error'), error);
    }
  }

  function render(result, file) {
    const preview = $('upload-preview');
    if (preview.src.startsWith('blob:')) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    $('why').hidden = true;
    $('why').replaceChildren();
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
    const known = getLabels();  // from /v1/models; the answer's own labels if that listed none
    const labels = known.length ? known : result.predictions;
    select.replaceChildren(...labels.map((l) => el('option', { value: l.label, text: l.display_name || l.label })));
    if (top) select.value = top.label;
    $('result-layout').hidden = false;
  }

  async function feedback(trueLabel) {
    if (!lastAnswer) return;
    try {
      await sendFeedback(lastAnswer, trueLabel);
      $('feedback-status').textContent = `Thanks — recorded "${trueLabel}".`;
    } catch (error) {
      $('feedback-status').textContent = `Feedback not recorded: ${error.message}`;
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
    if (!lastFile) return;
    const button = $('why-button');
    button.disabled = true;
    try {
      const result = await explain(lastFile, { filename: lastFile.name || 'photo' });
      showWhy($('why'), $('upload-preview').src, result.explanation);
    } catch (error) {
      showError($('upload-error'), error);
    } finally {
      button.disabled = false;
    }
  });
}
