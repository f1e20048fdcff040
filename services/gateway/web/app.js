// Entry point: wires the three sections; the label list (for feedback) comes from GET /v1/models.
import { getModels } from './api.js';
import { setupUpload } from './upload.js';
import { setupSlideshow } from './slideshow.js';
import { setupOperator } from './operator.js';

let labels = [];

// Labels of the first model version that lists them; tolerant of list- or dict-shaped answers.
export function labelsOf(models) {
  const list = Array.isArray(models) ? models : (models.models || []);
  for (const model of list) {
    for (const version of model.versions || []) {
      if (version.labels && version.labels.length) {
        return version.labels.map((l) => (typeof l === 'string' ? { label: l, display_name: l } : l));
      }
    }
  }
  return [];
}

getModels().then((models) => { labels = labelsOf(models); }).catch(() => { labels = []; });
setupUpload(() => labels);
setupSlideshow();
setupOperator();
document.body.dataset.ready = 'true';
