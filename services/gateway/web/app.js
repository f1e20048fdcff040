// Entry point: wires the three sections; the label list (for feedback) comes from GET /v1/models.
import { getModels } from './api.js';
import { setupUpload } from './upload.js';
import { setupSlideshow } from './slideshow.js';
import { setupOperator } from './operator.js';

let models = [];

// The labels /v1/models lists for model version `version` ([] when it lists none); tolerant of list- or
// dict-shaped answers. The gateway takes feedback only in the labels of the version that answered.
export function labelsOf(modelsAnswer, version) {
  const list = Array.isArray(modelsAnswer) ? modelsAnswer : (modelsAnswer.models || []);
  const chosen = list.flatMap((model) => model.versions || []).find((v) => v.version === version);
  const labels = (chosen && chosen.labels) || [];
  return labels.map((l) => (typeof l === 'string' ? { label: l, display_name: l } : l));
}

getModels().then((answer) => { models = answer; }).catch(() => { models = []; });
setupUpload((version) => labelsOf(models, version));
setupSlideshow();
setupOperator();
document.body.dataset.ready = 'true';
