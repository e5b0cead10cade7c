// The viewer page: send one X-ray to POST /predict?explain=true and show the answer with its
// class activation map. Same origin only; no outside assets.
"use strict";

const RAW_TYPES = ["image/jpeg", "image/png", "application/dicom"];
const $ = (id) => document.getElementById(id);

function headers(contentType) {
  const result = { "Content-Type": contentType };
  const key = $("api-key").value.trim();
  if (key) result["X-API-Key"] = key;
  return result;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function loadModel() {
  try {
    const response = await fetch("/model", { headers: headers("application/json") });
    if (!response.ok) {
      $("model").textContent = `Model information unavailable (${response.status})`;
      return;
    }
    const model = await response.json();
    $("model").textContent = `Model ${model.name} ${model.version}` +
      (model.explanations ? "" : " (no heat maps for this model)");
    $("disclaimer").textContent = model.disclaimer;
  } catch (error) {
    $("model").textContent = "The service cannot be reached.";
  }
}

async function predict(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  const type = RAW_TYPES.includes(file.type) ? file.type : "application/octet-stream";
  let response = await fetch("/predict?explain=true", { method: "POST", headers: headers(type), body: file });
  let body = await response.json();
  if (response.status === 422 && body.error && body.error.code === "explanation_unavailable") {
    response = await fetch("/predict", { method: "POST", headers: headers(type), body: file });
    body = await response.json();
  }
  if (!response.ok) {
    const error = body.error || { code: String(response.status), message: response.statusText };
    showError(`${error.message} (${error.code})`);
    return;
  }
  render(body);
}

function render(answer) {
  const label = $("label");
  label.textContent = answer.label;
  label.className = "label " + (answer.label === "NORMAL" ? "negative" : "positive");
  const rows = Object.entries(answer.probabilities).map(([name, p]) => {
    const row = document.createElement("tr");
    const percent = (100 * p).toFixed(1);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(1.5 * percent).toFixed(0)}px`; // CSSOM, allowed by the page's policy
    for (const content of [name, `${percent}%`, bar]) {
      const cell = document.createElement("td");
      cell.append(content);
      row.append(cell);
    }
    return row;
  });
  $("probabilities").replaceChildren(...rows);
  const positive = Object.keys(answer.probabilities).find((name) => name !== "NORMAL") || "";
  $("positive").textContent = positive;
  $("threshold").textContent = answer.threshold.toFixed(3);
  $("warnings").replaceChildren(...answer.warnings.map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  }));
  const dicom = $("dicom");
  dicom.replaceChildren();
  dicom.hidden = !answer.dicom;
  if (answer.dicom) {
    const facts = {
      Modality: answer.dicom.modality,
      "View position": answer.dicom.view_position || "not stated",
      Window: answer.dicom.window.source,
      "SOP instance UID": answer.dicom.sop_instance_uid || "not stated",
    };
    for (const [name, value] of Object.entries(facts)) {
      const term = document.createElement("dt");
      term.textContent = name;
      const detail = document.createElement("dd");
      detail.textContent = value;
      dicom.append(term, detail);
    }
  }
  const explanation = answer.explanation;
  $("heatmap").hidden = !explanation;
  $("opacity").disabled = !explanation;
  if (explanation) {
    $("image").src = "data:image/png;base64," + explanation.image_png;
    $("heatmap").src = "data:image/png;base64," + explanation.heatmap_png;
    $("heatmap").style.opacity = $("opacity").value;
    $("explained").textContent = `Class activation map for ${explanation.target_class}`;
  } else {
    $("image").removeAttribute("src");
    $("explained").textContent = "No heat map for this model";
  }
  $("result").hidden = false;
  document.body.dataset.state = "answered";
}

function choose(files) {
  if (files && files.length) predict(files[0]).catch((error) => showError(String(error)));
}

document.addEventListener("DOMContentLoaded", () => {
  loadModel();
  $("file").addEventListener("change", (event) => choose(event.target.files));
  $("opacity").addEventListener("input", (event) => { $("heatmap").style.opacity = event.target.value; });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files);
  });
});
