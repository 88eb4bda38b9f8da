async function uploadReferenceImage(file) {
  const arrayBuffer = await file.arrayBuffer();
  const filename = encodeURIComponent(file.name);
  
  const response = await fetch(
    `${API_BASE}/api/v1/assets?filename=${filename}`,
    {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: arrayBuffer
    }
  );
  
  const result = await response.json();
  return result.path;  // Use this in vace_ref_images
}
