// Small DOM and number helpers shared by the page's sections.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

export const pct = (x) => (x === null || x === undefined || Number.isNaN(x)) ? '–' : `${(100 * x).toFixed(1)}%`;
export const ms = (x) => (x === null || x === undefined) ? '–' : `${Number(x).toFixed(1)}`;

export function showError(box, error) {
  if (!error) { box.hidden = true; box.textContent = ''; return; }
  box.textContent = error.message || String(error);
  box.hidden = false;
}

export const versionOf = (result) => String(result.model && result.model.version);
export const topLabel = (result) => result.predictions && result.predictions.length ? result.predictions[0].label : null;
