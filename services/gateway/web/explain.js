// "Why?": the gateway's Grad-CAM overlay (a PNG as large as the photo is displayed, transparent where the model
// did not look) laid over the photo, with an opacity slider.
import { explain } from './api.js';
import { el } from './format.js';

const nameOf = (explanation) => explanation.display_name || explanation.label;

// A figure: the photo with the explanation's overlay on top (both fill the same box), and a caption.
export function heatmapFigure(photoUrl, explanation, caption, opacity = 0.6) {
  const overlay = el('img', {
    class: 'heatmap-overlay', src: `data:image/png;base64,${explanation.overlay_png}`,
    alt: `Heatmap of where the model saw ${nameOf(explanation)}`, 'data-label': explanation.label,
  });
  overlay.style.opacity = String(opacity);
  return el('figure', { class: 'heatmap', 'data-label': explanation.label },
    el('div', { class: 'heatmap-frame' }, el('img', { src: photoUrl, alt: 'The photo' }), overlay),
    el('figcaption', { text: caption }));
}

// A labelled range input setting the opacity of every overlay `overlays()` returns.
export function opacitySlider(id, overlays, percent = 60) {
  const input = el('input', { type: 'range', id, min: '0', max: '100', step: '1', value: String(percent) });
  input.addEventListener('input', () => {
    for (const overlay of overlays()) overlay.style.opacity = String(Number(input.value) / 100);
  });
  return el('div', { class: 'controls opacity' }, el('label', { for: id, text: 'Heatmap opacity' }), input);
}

// The upload's "Why?": the overlay for the predicted class in `box`.
export function showWhy(box, photoUrl, explanation) {
  box.replaceChildren(
    heatmapFigure(photoUrl, explanation, `Where the model looked to answer ${nameOf(explanation)}`),
    opacitySlider('why-opacity', () => box.querySelectorAll('.heatmap-overlay')));
  box.hidden = false;
}

// A misclassified demo photo's heatmaps for the predicted and the true class, side by side.
export async function whyWrong(blob, url, predictedLabel, trueLabel, opacity) {
  const predicted = (await explain(blob, { explainClass: predictedLabel })).explanation;
  const truth = (await explain(blob, { explainClass: trueLabel })).explanation;
  return el('div', { class: 'why-pair' },
    heatmapFigure(url, predicted, `Why ${nameOf(predicted)} (predicted)`, opacity),
    heatmapFigure(url, truth, `Evidence for ${nameOf(truth)} (true)`, opacity));
}
