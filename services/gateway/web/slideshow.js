// Cycle through the model's demo photos, classify each, keep running accuracy per answering version.
import { getDemo, demoPhotoUrl, classify } from './api.js';
import { opacitySlider, whyWrong } from './explain.js';
import { el, pct, showError, versionOf, topLabel } from './format.js';

const $ = (id) => document.getElementById(id);

export function demoPhotosOf(answer) {
  return Array.isArray(answer) ? answer : (answer.photos || answer.items || []);
}

export function setupSlideshow() {
  let photos = null;
  let next = 0;
  let timer = null;
  let busy = false;
  const stats = new Map();  // version -> {n, correct}

  async function load() {
    if (photos) return photos;
    photos = demoPhotosOf(await getDemo());
    $('slide-progress').textContent = `Demo photos: ${photos.length}`;
    return photos;
  }

  async function classifyOne(photo) {
    const response = await fetch(demoPhotoUrl(photo.sha256));
    if (!response.ok) throw new Error(`Demo photo ${photo.sha256.slice(0, 12)} could not be loaded (${response.status})`);
    const blob = await response.blob();
    const result = await classify(blob, { topK: 1, filename: `${photo.sha256}.jpg` });
    const predicted = topLabel(result);
    const correct = predicted === photo.label;
    const version = versionOf(result);
    const s = stats.get(version) || { n: 0, correct: 0 };
    s.n += 1; s.correct += correct ? 1 : 0;
    stats.set(version, s);
    return { photo, result, predicted, correct, blob, url: URL.createObjectURL(blob) };
  }

  function renderStats() {
    const rows = [...stats.entries()].sort();
    const total = rows.reduce((a, [, s]) => ({ n: a.n + s.n, correct: a.correct + s.correct }), { n: 0, correct: 0 });
    if (rows.length > 1) rows.push(['all', total]);
    $('slide-stats').replaceChildren(...rows.map(([version, s]) => el('tr', { 'data-version': version },
      el('th', { scope: 'row', text: version }), el('td', { class: 'n', text: String(s.n) }),
      el('td', { class: 'correct', text: String(s.correct) }), el('td', { class: 'accuracy', text: pct(s.correct / s.n) }),
      el('td', { class: 'error-rate', text: pct(1 - s.correct / s.n) }))));
  }

  function figure(item) {
    const truth = item.photo.display_name || item.photo.label;
    const top = item.result.predictions[0];
    return el('figure', { class: item.correct ? 'slide right' : 'slide wrong', 'data-sha256': item.photo.sha256,
                          'data-predicted': item.predicted || '', 'data-truth': item.photo.label },
      el('img', { src: item.url, alt: `Demo photo of ${truth}` }),
      el('figcaption', {},
        el('span', { text: `Truth: ${truth}` }), el('br'),
        el('span', { text: `Predicted: ${top ? (top.display_name || top.label) : '–'}` +
                           (item.result.not_a_mushroom ? ' (not a mushroom)' : '') }), el('br'),
        el('span', { class: 'meta', text: `v${item.result.model.version} · ${item.correct ? 'right' : 'wrong'}` })));
  }

  // The heatmaps of a wrong answer beside its photo in the gallery, under one opacity slider for all of them.
  async function explainMiss(li, item) {
    if (!document.getElementById('misses-opacity')) {
      const overlays = () => $('slide-misses').querySelectorAll('.heatmap-overlay');
      $('slide-misses').before(opacitySlider('misses-opacity', overlays));
    }
    const opacity = Number($('misses-opacity').value) / 100;
    try {
      li.append(await whyWrong(item.blob, item.url, item.predicted, item.photo.label, opacity));
    } catch (error) {
      li.append(el('p', { class: 'error', text: `No heatmap: ${error.message}` }));
    }
  }

  async function step() {
    if (busy) return;
    busy = true;
    showError($('slide-error'), null);
    try {
      const all = await load();
      if (!all.length) throw new Error('The published model has no demo photos.');
      const batch = Number($('slide-batch').value);
      const chosen = [];
      for (let i = 0; i < batch; i++) chosen.push(all[(next + i) % all.length]);
      next = (next + batch) % all.length;
      const items = [];
      for (const photo of chosen) items.push(await classifyOne(photo));  // sequential: keeps the server load gentle
      for (const old of $('slide-current').querySelectorAll('.slide.right img')) URL.revokeObjectURL(old.src);  // wrong ones live on in the gallery
      $('slide-current').replaceChildren(...items.map(figure));
      const misses = items.filter((i) => !i.correct).map((item) => [el('li', {}, figure(item)), item]);
      for (const [li] of misses) $('slide-misses').append(li);
      const seen = [...stats.values()].reduce((a, s) => a + s.n, 0);
      $('slide-progress').textContent = `Demo photos: ${all.length} · classified so far: ${seen}`;
      renderStats();
      for (const [li, item] of misses) await explainMiss(li, item);  // after the answers: they come first
    } catch (error) {
      showError($('slide-error'), error);
      stop();
    } finally {
      busy = false;
    }
  }

  function start() {
    stop();
    $('slide-start').disabled = true;
    $('slide-stop').disabled = false;
    const loop = async () => {
      await step();
      if (!$('slide-start').disabled) return;  // paused meanwhile
      timer = setTimeout(loop, 1000 * Number($('slide-interval').value));
    };
    loop();
  }

  function stop() {
    clearTimeout(timer);
    timer = null;
    $('slide-start').disabled = false;
    $('slide-stop').disabled = true;
  }

  $('slide-start').addEventListener('click', start);
  $('slide-stop').addEventListener('click', stop);
  $('slide-step').addEventListener('click', step);
  load().catch((error) => {
    photos = null;
    $('slide-progress').textContent = 'Demo photos: unavailable';
    showError($('slide-error'), error);
  });
}
